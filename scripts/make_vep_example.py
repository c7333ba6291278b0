"""Write the small worked example of `task=vep` under examples/vep/ (deterministic).

reference.fa: two synthetic contigs (chr1 3,000 bp GC-rich like clade A of the example data,
chr2 1,500 bp AT-rich like clade B), 60 bases per line, with its samtools .fai index;
variants.vcf and variants.tsv: the same 10 variants (SNVs, three ALTs at one position, an
insertion, a deletion, one near a contig start so its window is clipped).
"""

from __future__ import annotations

import random
from pathlib import Path

import pysam

OUT = Path(__file__).resolve().parents[1] / "examples" / "vep"


def contig(rng: random.Random, length: int, gc: float) -> str:
    """A random contig of the given GC fraction."""
    weights = [(1 - gc) / 2, gc / 2, gc / 2, (1 - gc) / 2]
    return "".join(rng.choices("ACGT", weights=weights, k=length))


def main() -> None:
    """Write the VEP example's reference and variants."""
    rng = random.Random(7)
    seqs = {"chr1": contig(rng, 3000, 0.8), "chr2": contig(rng, 1500, 0.2)}
    OUT.mkdir(parents=True, exist_ok=True)
    fasta = OUT / "reference.fa"
    with fasta.open("w") as f:
        for name, seq in seqs.items():
            f.write(f">{name}\n" + "".join(seq[i : i + 60] + "\n" for i in range(0, len(seq), 60)))
    pysam.faidx(str(fasta))
    # (chrom, 1-based pos, ref length or None for an SNV, alt)
    picks = [
        ("chr1", 1200, None, "A"),
        ("chr1", 1200, None, "T"),
        ("chr1", 1200, None, "C"),
        ("chr1", 2000, None, "T"),
        ("chr1", 900, 1, "+GGT"),  # insertion after the REF base
        ("chr1", 1600, 4, "-"),  # deletion of 3 bases after the REF base
        ("chr1", 20, None, "A"),  # window clipped at the contig start
        ("chr2", 700, None, "G"),
        ("chr2", 701, None, "C"),
        ("chr2", 1450, None, "A"),  # window clipped at the contig end
    ]
    rows = []
    for chrom, pos, ref_len, alt in picks:
        seq = seqs[chrom]
        if ref_len is None:
            ref = seq[pos - 1]
            if alt == ref:
                alt = {"A": "G", "C": "T", "G": "A", "T": "C"}[ref]
        else:
            ref = seq[pos - 1 : pos - 1 + ref_len]
            alt = ref[0] + alt[1:] if alt.startswith("+") else ref[0]
        rows.append((chrom, pos, ref, alt))
    header = [
        "##fileformat=VCFv4.2",
        "##reference=reference.fa",
        *(f"##contig=<ID={n},length={len(s)}>" for n, s in seqs.items()),
        "#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO",
    ]
    body = [f"{c}\t{p}\tv{i}\t{r}\t{a}\t.\tPASS\t." for i, (c, p, r, a) in enumerate(rows)]
    (OUT / "variants.vcf").write_text("\n".join(header + body) + "\n")
    table = ["chrom\tpos\tref\talt"] + [f"{c}\t{p}\t{r}\t{a}" for c, p, r, a in rows]
    (OUT / "variants.tsv").write_text("\n".join(table) + "\n")


if __name__ == "__main__":
    main()
