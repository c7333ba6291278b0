"""`task=vep`: zero-shot variant effects as the Evo 2 BRCA1 notebook computes them.

    python launch.py task=vep ckpt.path=outputs/runs/evo2_tiny-ctx512 \
        vep.reference=examples/vep/reference.fa vep.variants=examples/vep/variants.vcf vep.window=512

For a variant at 1-based `pos`, `p = pos - 1`; the reference window is
`seq[p - window//2 : p + window//2]` of its chromosome, clipped to the contig; the alternative
window is the same span with REF replaced by ALT. A window's score is the mean log-likelihood over
positions 1..L-1 (as `task=score`: natural log, first token not scored); `delta = alt - ref`.

Shared work (`vep.share_prefix=true`, exact): variants at the same position have the same
reference window, scored once; the reference pass keeps the model's state (chunked.py: FIR tails,
modal states, KV cache) at each variant's offset `k`, and each alternative window continues from
that state with its own tokens `alt + ref_window[k + len(ref):]`. Positions before `k` are the
reference's (same tokens, causal model), so the alternative costs `L - k` tokens instead of `L`.

Output folder (`vep.output`, default `<run folder>/vep/<time>`; written atomically): `vep.tsv`
(chrom, pos, ref, alt, ref_score, alt_score, delta, and with `vep.reverse_complement=true`
rc_ref_score, rc_alt_score, rc_delta, mean_delta = (delta + rc_delta) / 2), in input order;
`skipped.tsv` (variants skipped by `vep.on_mismatch=skip`, with the reason); `vep.json` (settings,
counts, model, checkpoint, timing).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from evo2_hydra.config import Dtype, OnError, RunConfig, VepConfig
from evo2_hydra.data.text import TextPolicy, policy_for_checkpoint
from evo2_hydra.errors import UserError
from evo2_hydra.infer import common
from evo2_hydra.infer.shard import rank_and_world, run_sharded
from evo2_hydra.infer.variants import Variant, open_reference, read_variants
from evo2_hydra.model import StripedHyena2
from evo2_hydra.model.chunked import chunk_spans, forward_chunk, new_cache
from evo2_hydra.model.decode import clone_cache
from evo2_hydra.score import reverse_complement

log = logging.getLogger(__name__)

COLUMNS = ["chrom", "pos", "ref", "alt", "ref_score", "alt_score", "delta"]
RC_COLUMNS = ["rc_ref_score", "rc_alt_score", "rc_delta", "mean_delta"]


@dataclass
class Site:
    """One reference window and the variants that share it (same chromosome and position)."""

    chrom: str
    pos: int
    start: int  # 0-based window start on the contig
    window: str
    offset: int  # k: the variant's index in the window
    variants: list[Variant] = field(default_factory=list)


# ------------------------------------------------------------------------------ windows


def build_sites(
    variants: list[Variant],
    fasta,
    window: int,
    context: int,
    on_mismatch: OnError,
    policy: TextPolicy | None = None,
) -> tuple[list[Site], list[tuple[Variant, str]]]:
    """Group variants by position, fetch each window once, check REF; returns (sites, skipped).

    Windows become model input under the run's text policy (`policy`): upper-cased when the run
    trained upper-cased (soft-masked lowercase repeats score as the model saw them in training),
    characters outside data.charset per data.alphabet (skip: the variants there are skipped).
    """
    contigs = dict(zip(fasta.references, fasta.lengths))
    sites: dict[tuple[str, int], Site] = {}
    skipped: list[tuple[Variant, str]] = []
    for v in variants:
        if v.chrom not in contigs:
            shown = ", ".join(list(contigs)[:5]) + (" ..." if len(contigs) > 5 else "")
            raise UserError(
                f"{v.where}: chromosome {v.chrom!r} of variant {v.chrom}:{v.pos} is not in the "
                f"reference (it has {shown})"
            )
        length = contigs[v.chrom]
        if v.pos > length:
            raise UserError(f"{v.where}: {v.label()} lies past the end of {v.chrom} ({length} bp)")
        key = (v.chrom, v.pos)
        site = sites.get(key)
        if site is None:
            p = v.pos - 1
            start, end = max(0, p - window // 2), min(length, p + window // 2)
            text = fasta.fetch(v.chrom, start, end)
            if policy is not None:
                where = f"reference {v.chrom}:{start + 1}-{end} (for {v.where})"
                normalized = policy.normalize(text, where, model=True)
                if normalized is None:  # data.alphabet=skip
                    skipped.append((v, f"reference window: {policy.problem(text)}"))
                    continue
                text = normalized
            site = Site(v.chrom, v.pos, start, text, p - start)
            sites[key] = site
        k = site.offset
        found = site.window[k : k + len(v.ref)]
        reason = None
        if k + len(v.ref) > len(site.window):
            reason = f"REF {v.ref} extends past the window end"
        elif found.upper() != v.ref.upper():
            reason = f"REF {v.ref} does not match the reference {found!r}"
        if reason is not None:
            if on_mismatch == OnError.skip:
                skipped.append((v, reason))
                continue
            raise UserError(
                f"{v.where}: {v.label()}: {reason} (vep.on_mismatch=skip skips such variants)"
            )
        alt_len = len(site.window) - len(v.ref) + len(v.alt)
        if alt_len > context:
            raise UserError(
                f"{v.where}: {v.label()}: its alternative window has {alt_len} tokens, more than the "
                f"model's context {context}; use a smaller vep.window"
            )
        if min(alt_len, len(site.window)) < 2:
            raise UserError(f"{v.where}: {v.label()}: the window has fewer than 2 bases to score")
        site.variants.append(v)
    return [s for s in sites.values() if s.variants], skipped


def alt_window(site: Site, v: Variant) -> str:
    """The variant's window with REF replaced by ALT."""
    k = site.offset
    return site.window[:k] + v.alt + site.window[k + len(v.ref) :]


# ------------------------------------------------------------------------------ scoring


def _ids(texts: list[str], device) -> torch.Tensor:
    return common.pad_batch([common.tokenize(t) for t in texts], device)


@torch.no_grad()
def score_from_scratch(model: StripedHyena2, texts: list[str], chunk: int) -> list[float]:
    """Mean log-likelihood over positions 1..L-1 of each text, one full forward each."""
    scores = []
    for text in texts:
        ids = _ids([text], model.embedding.weight.device)
        lp = common.sequence_log_probs(model, ids, chunk)
        scores.append(lp.double().sum().item() / (ids.shape[1] - 1))
    return scores


@torch.no_grad()
def score_shared(
    model: StripedHyena2, window: str, edits: list[tuple[int, str, str]], chunk: int
) -> tuple[float, list[float]]:
    """The reference window's score and each edit's (offset k, ref, alt) alternative score.

    One pass over the reference keeps the state at every distinct k; each alternative continues
    from it (identical prefix, causal model), batched per k.
    """
    device = model.embedding.weight.device
    ids = _ids([window], device)
    length = ids.shape[1]
    extra = max(0, max(len(a) - len(r) for _, r, a in edits))
    offsets = sorted({k for k, _, _ in edits if k >= 1})
    cuts = sorted({b for _, b in chunk_spans(length, chunk)} | set(offsets))
    cache = new_cache(length + extra)
    snapshots: dict[int, tuple[object, torch.Tensor]] = {}
    parts, start = [], 0
    for stop in cuts:
        logits = forward_chunk(model, ids[:, start:stop], cache)
        parts.append(common.next_token_log_probs(logits, ids, start, stop))
        if stop in offsets:
            snapshots[stop] = (clone_cache(cache), torch.log_softmax(logits[:, -1].float(), -1))
        start = stop
    ref_lp = torch.cat(parts, dim=1)[0].double()  # [L-1], entry i-1 = log p(token i | < i)
    ref_score = ref_lp.sum().item() / (length - 1)

    alt_scores: list[float | None] = [None] * len(edits)
    for k in offsets:
        rows = [i for i, (kk, _, _) in enumerate(edits) if kk == k]
        suffixes = [edits[i][2] + window[k + len(edits[i][1]) :] for i in rows]
        prefix_sum = ref_lp[: k - 1].sum().item()
        snapshot, last = snapshots[k]
        tokens = [common.tokenize(s) for s in suffixes]
        nonempty = [t for t in tokens if t]
        sums = [0.0] * len(rows)
        if nonempty:
            sids = common.pad_batch([t or [common.PAD_ID] for t in tokens], device)
            state = clone_cache(snapshot, batch=len(rows))
            conts = []
            for a, b in chunk_spans(sids.shape[1], chunk):
                logits = forward_chunk(model, sids[:, a:b], state)
                conts.append(common.next_token_log_probs(logits, sids, a, b))
            cont = torch.cat(conts, dim=1).double()
            for j, t in enumerate(tokens):
                if t:
                    sums[j] = last[0, t[0]].item() + cont[j, : len(t) - 1].sum().item()
        for j, i in enumerate(rows):
            total_len = k + len(tokens[j])
            alt_scores[i] = (prefix_sum + sums[j]) / (total_len - 1)
    for i, (k, ref, alt) in enumerate(edits):
        if k < 1:  # the variant starts the window: nothing to share
            alt_scores[i] = score_from_scratch(model, [alt + window[len(ref) :]], chunk)[0]
    return ref_score, alt_scores


def score_site(model: StripedHyena2, site: Site, chunk: int, share: bool, rc: bool) -> list[dict]:
    """vep.tsv rows (as dicts) for the variants of one site."""
    edits = [(site.offset, v.ref, v.alt) for v in site.variants]
    if share:
        ref_score, alt_scores = score_shared(model, site.window, edits, chunk)
    else:
        scores = score_from_scratch(
            model, [site.window] + [alt_window(site, v) for v in site.variants], chunk
        )
        ref_score, alt_scores = scores[0], scores[1:]
    rc_ref, rc_alts = None, None
    if rc:
        rc_window = reverse_complement(site.window)
        rc_edits = [
            (
                len(site.window) - site.offset - len(v.ref),
                reverse_complement(v.ref),
                reverse_complement(v.alt),
            )
            for v in site.variants
        ]
        if share:
            rc_ref, rc_alts = score_shared(model, rc_window, rc_edits, chunk)
        else:
            scores = score_from_scratch(
                model,
                [rc_window] + [reverse_complement(alt_window(site, v)) for v in site.variants],
                chunk,
            )
            rc_ref, rc_alts = scores[0], scores[1:]
    rows = []
    for i, v in enumerate(site.variants):
        row = {
            "index": v.index,
            "chrom": v.chrom,
            "pos": v.pos,
            "ref": v.ref,
            "alt": v.alt,
            "ref_score": ref_score,
            "alt_score": alt_scores[i],
            "delta": alt_scores[i] - ref_score,
        }
        if rc:
            rc_delta = rc_alts[i] - rc_ref
            row.update(
                rc_ref_score=rc_ref,
                rc_alt_score=rc_alts[i],
                rc_delta=rc_delta,
                mean_delta=(row["delta"] + rc_delta) / 2,
            )
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------ the task


def _format(value) -> str:
    return f"{value:.8g}" if isinstance(value, float) else str(value)


def write_rows(rows: list[dict], path: Path, rc: bool) -> None:
    """Write the variant scores as TSV (with the reverse-complement columns when requested)."""
    columns = COLUMNS + (RC_COLUMNS if rc else [])
    lines = ["\t".join(columns)]
    lines += [
        "\t".join(_format(r[c]) for c in columns) for r in sorted(rows, key=lambda r: r["index"])
    ]
    path.write_text("\n".join(lines) + "\n")


def run_vep(run: RunConfig) -> Path:
    """Score every variant of `vep.variants` against `vep.reference`; returns the output folder."""
    settings: VepConfig = run.vep
    if not settings.reference or not settings.variants:
        raise UserError("task=vep needs vep.reference (FASTA) and vep.variants (VCF or TSV/CSV)")
    source = common.describe(run.ckpt, run.model, run.data)
    if settings.window > source.context:
        raise UserError(
            f"vep.window={settings.window} exceeds the model's context ckpt.context={source.context} "
            f"(from {source.checkpoint.get('run_config', 'the command line')})"
        )
    variants = read_variants(settings.variants)
    fasta = open_reference(settings.reference, Path(run.paths.cache_dir) / "fai")
    try:
        policy, _ = policy_for_checkpoint(run.ckpt.path, run.data)  # as the run trained
        sites, skipped = build_sites(
            variants, fasta, settings.window, source.context, settings.on_mismatch, policy
        )
    finally:
        fasta.close()
    _, world = rank_and_world()
    sharded = max(world, run.cluster.world_size) > 1
    output = common.output_folder(settings.output, "vep.output", "vep", source, sharded)
    dtype = torch.bfloat16 if settings.dtype == Dtype.bfloat16 else torch.float32
    if skipped:
        log.warning(
            "skipping %d variant(s) whose REF does not match (vep.on_mismatch=skip)", len(skipped)
        )
    rc = settings.reverse_complement

    def work(items: Sequence[Site], folder: Path) -> None:
        from evo2_hydra.score import load_scoring_model, pick_device

        device = common.device_for_rank(pick_device(run.cluster.device))
        model = load_scoring_model(source.model, run.ckpt, dtype, device)
        rows, started = [], time.perf_counter()
        bar = common.progress(sum(len(s.variants) for s in items), "vep")
        with common.cpu_threads_for(device, source.model):
            for site in items:
                batch, longest = len(site.variants), len(site.window) + 64
                chunk = common.resolve_chunk(
                    settings.chunk_tokens, model, source.model, batch, longest
                )
                rows += score_site(model, site, chunk, settings.share_prefix, rc)
                bar.update(len(site.variants))
        bar.close()
        write_outputs(folder, rows, time.perf_counter() - started)

    def write_outputs(folder: Path, rows: list[dict], seconds: float) -> None:
        write_rows(rows, folder / "vep.tsv", rc)
        (folder / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        lines = ["chrom\tpos\tref\talt\treason"] + [
            f"{v.chrom}\t{v.pos}\t{v.ref}\t{v.alt}\t{reason}" for v, reason in skipped
        ]
        (folder / "skipped.tsv").write_text("\n".join(lines) + "\n")
        summary = {
            "task": "vep",
            **{k: (v.value if hasattr(v, "value") else v) for k, v in asdict(settings).items()},
            "variants_read": len(variants),
            "scored": len(rows),
            "skipped_ref_mismatch": len(skipped),
            "seconds": seconds,
            "variants_per_second": len(rows) / seconds if seconds else None,
            "model": source.model.name,
            "checkpoint": source.checkpoint,
        }
        (folder / "vep.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")

    def merge(shards: list[Path], target: Path) -> None:
        rows = [
            json.loads(line) for s in shards for line in (s / "rows.jsonl").read_text().splitlines()
        ]
        seconds = sum(json.loads((s / "vep.json").read_text())["seconds"] for s in shards)
        write_outputs(target, rows, seconds)

    run_sharded(run, "vep", output, sites, work, merge, run_vep)
    log.info("wrote %d variant scores to %s", len(variants) - len(skipped), output / "vep.tsv")
    return output
