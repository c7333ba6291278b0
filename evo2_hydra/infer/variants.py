"""Reading what `task=vep` needs: an indexed reference (pysam.FastaFile: random access, never the
whole genome in memory) and variants (pysam.VariantFile for VCF/BCF, csv for TSV/CSV).

Every variant is read and checked before any model work; each problem is one line naming the file
and the variant.
"""

from __future__ import annotations

import csv
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from evo2_hydra.errors import UserError

DNA = re.compile(r"^[ACGTNacgtn]+$")


@dataclass(frozen=True)
class Variant:
    """One variant: chromosome, 1-based position, REF and ALT, in input order."""

    index: int  # input order (0-based)
    chrom: str
    pos: int  # 1-based, as in VCF
    ref: str
    alt: str
    where: str  # file:line or file record, for messages

    def label(self) -> str:
        return f"variant {self.chrom}:{self.pos} {self.ref}>{self.alt}"


def open_reference(path: str, index_dir: Path):
    """pysam.FastaFile on `path`; an index next to the file is used, else one is built in
    `index_dir` (the user's folder is never written to). Plain gzip is refused (no random access).
    """
    import pysam

    source = Path(path)
    if not source.is_file():
        raise UserError(f"vep.reference={path}: no such file")
    fai, gzi = Path(f"{source}.fai"), Path(f"{source}.gzi")
    compressed = source.suffix == ".gz"
    if not fai.is_file() or (compressed and not gzi.is_file()):
        stat = source.stat()
        key = hashlib.sha1(
            f"{source.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()
        ).hexdigest()[:16]
        index_dir.mkdir(parents=True, exist_ok=True)
        fai, gzi = index_dir / f"{key}.fai", index_dir / f"{key}.gzi"
        if not fai.is_file():
            try:
                pysam.faidx(str(source), "--fai-idx", str(fai), "--gzi-idx", str(gzi))
            except pysam.utils.SamtoolsError as err:
                detail = str(err).strip().splitlines()
                hint = " (a .gz reference must be bgzip-compressed: `bgzip -d` then `bgzip`)"
                raise UserError(
                    f"vep.reference={path}: cannot index it ({detail[-1] if detail else err})"
                    + (hint if compressed else "")
                ) from None
    try:
        return pysam.FastaFile(
            str(source),
            filepath_index=str(fai),
            filepath_index_compressed=str(gzi) if compressed else None,
        )
    except (OSError, ValueError) as err:
        raise UserError(f"vep.reference={path}: cannot open it ({err})") from None


def _check_alleles(ref: str, alt: str, where: str, chrom: str, pos: int) -> None:
    label = f"{where}: variant {chrom}:{pos} {ref}>{alt}"
    if alt.startswith("<") or "[" in alt or "]" in alt or alt in ("*", "."):
        raise UserError(
            f"{label}: symbolic or missing ALT {alt!r} is not supported (sequence alleles only)"
        )
    if not DNA.match(ref) or not DNA.match(alt):
        raise UserError(f"{label}: REF and ALT must be A/C/G/T/N sequences")
    if pos < 1:
        raise UserError(f"{label}: POS must be 1-based (>= 1)")


def read_variants(path: str) -> list[Variant]:
    """VCF/VCF.gz/BCF (one ALT per record) or TSV/CSV with a header naming chrom,pos,ref,alt."""
    source = Path(path)
    if not source.is_file():
        raise UserError(f"vep.variants={path}: no such file")
    name = source.name.lower()
    if name.endswith((".vcf", ".vcf.gz", ".vcf.bgz", ".bcf")):
        return _read_vcf(source)
    if name.endswith((".tsv", ".csv", ".txt")):
        return _read_table(source)
    raise UserError(f"vep.variants={path}: expected .vcf, .vcf.gz, .bcf, .tsv or .csv")


def _read_vcf(source: Path) -> list[Variant]:
    import pysam

    variants: list[Variant] = []
    try:
        with pysam.VariantFile(str(source)) as vcf:
            for n, record in enumerate(vcf, start=1):
                where = f"{source} record {n}"
                alts = record.alts or ()
                if len(alts) != 1:
                    shown = ",".join(alts) if alts else "."
                    raise UserError(
                        f"{where}: variant {record.chrom}:{record.pos} has ALT {shown}: one ALT per "
                        "record expected (split multi-allelic sites, e.g. `bcftools norm -m -`)"
                    )
                _check_alleles(record.ref, alts[0], where, record.chrom, record.pos)
                variants.append(
                    Variant(len(variants), record.chrom, record.pos, record.ref, alts[0], where)
                )
    except (OSError, ValueError) as err:
        raise UserError(f"vep.variants={source}: not a readable VCF ({err})") from None
    if not variants:
        raise UserError(f"vep.variants={source}: no variants")
    return variants


def _read_table(source: Path) -> list[Variant]:
    text = source.read_text(encoding="utf-8")
    delimiter = "\t" if "\t" in text.splitlines()[0] else ","
    rows = csv.reader(text.splitlines(), delimiter=delimiter)
    header = [h.strip().lower() for h in next(rows, [])]
    need = ("chrom", "pos", "ref", "alt")
    missing = [c for c in need if c not in header]
    if missing:
        raise UserError(
            f"{source}:1: header must name columns chrom,pos,ref,alt (missing {','.join(missing)})"
        )
    col = {c: header.index(c) for c in need}
    variants: list[Variant] = []
    for lineno, row in enumerate(rows, start=2):
        if not row or not "".join(row).strip():
            continue
        where = f"{source}:{lineno}"
        try:
            chrom, pos, ref, alt = (row[col[c]].strip() for c in need)
            pos_int = int(pos)
        except (IndexError, ValueError):
            raise UserError(
                f"{where}: expected chrom,pos,ref,alt with an integer 1-based pos"
            ) from None
        if "," in alt:
            raise UserError(
                f"{where}: variant {chrom}:{pos} has ALT {alt}: one ALT per line expected"
            )
        _check_alleles(ref, alt, where, chrom, pos_int)
        variants.append(Variant(len(variants), chrom, pos_int, ref, alt, where))
    if not variants:
        raise UserError(f"vep.variants={source}: no variants")
    return variants
