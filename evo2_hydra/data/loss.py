"""Loss weights as savanna trains Evo 2 (`savanna/training.py` `_get_batch_ar`), and the loss TRAIN
calls.

The batch carries the final per-position weights, so `lm_loss(logits, batch)` needs no config:

    loss = Σ loss_weight · CE / Σ loss_mask

- `loss_mask`: 1 where a position is trained at all (input-side EOD/PAD masks, label-side PAD mask
  in padded packing, control tags).
- `loss_weight`: loss_mask times the case weight w ∈ {1, lowercase_weight}:
  `none`/`upper`: w = 1; `weighted`: w as is (savanna divides by Σ mask);
  `normalized_weighted`: w rescaled per micro-batch so Σ loss_weight = Σ loss_mask, which turns
  the formula above into Σ w·CE / Σ w over the unmasked positions (savanna's normalize_per_batch).
"""

from __future__ import annotations

import numpy as np

from evo2_hydra.config import ToUpper
from evo2_hydra.data import tokenizer

# Control-tag characters (savanna utils.mask_control_tags).
TAG_MARKERS = (ord("@"), ord("#"))  # masked wherever they are the label
SEGMENT_BOUNDARIES = (ord("|"), tokenizer.EOD)
TAG_CONTENT = (ord("_"), ord(";"), ord(" "))  # a segment containing any of these is a tag


def upper_case(ids: np.ndarray) -> np.ndarray:
    """Token ids of a-z become A-Z; everything else is unchanged."""
    lower = (ids >= tokenizer.LOWER_A) & (ids <= tokenizer.LOWER_Z)
    return np.where(lower, ids - tokenizer.CASE_OFFSET, ids)


def control_tag_mask(labels: np.ndarray) -> np.ndarray:
    """Boolean [B, T]: True where a label belongs to a control tag (to be dropped from the loss).

    Segments run between boundaries (`|`, EOD, and the row ends); a segment containing `_`, `;`
    or a space is a tag: all of it, and its `|` delimiters (not EOD), is masked. `@` and `#`
    labels are masked wherever they are.
    """
    labels = np.asarray(labels)
    rows, width = labels.shape
    boundary = np.isin(labels, SEGMENT_BOUNDARIES)
    # Segment id of each position: boundaries seen so far in its row, made unique across rows.
    # A boundary gets the id of the segment to its right; the one to its left is id - 1.
    segment = np.cumsum(boundary, axis=1) + (np.arange(rows) * (width + 1))[:, None]
    content = np.isin(labels, TAG_CONTENT) & ~boundary
    is_tag_segment = np.zeros(rows * (width + 1) + 1, dtype=bool)
    is_tag_segment[segment[content]] = True
    masked = is_tag_segment[segment] & ~boundary
    bar = labels == SEGMENT_BOUNDARIES[0]
    masked |= bar & (is_tag_segment[segment] | is_tag_segment[segment - 1])
    masked |= np.isin(labels, TAG_MARKERS)
    return masked


def loss_mask_and_weights(
    inputs: np.ndarray,
    labels: np.ndarray,
    *,
    to_upper: ToUpper,
    lowercase_weight: float,
    mask_control_tags: bool,
    eod_mask_loss: bool,
    pad_mask_loss: bool,
    mask_pad_labels: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """(loss_mask, loss_weight), both float32 [B, T], from the raw (not upper-cased) tokens.

    `mask_pad_labels` is our padded-packing rule: a position whose label is PAD is not trained.
    `eod_mask_loss`/`pad_mask_loss` are savanna's input-side masks.
    """
    mask = np.ones(labels.shape, dtype=bool)
    if eod_mask_loss:
        mask &= inputs != tokenizer.EOD
    if pad_mask_loss:
        mask &= inputs != tokenizer.PAD
    if mask_pad_labels:
        mask &= labels != tokenizer.PAD
    if mask_control_tags:
        mask &= ~control_tag_mask(labels)
    mask_f = mask.astype(np.float32)
    if to_upper not in (ToUpper.weighted, ToUpper.normalized_weighted):
        return mask_f, mask_f.copy()
    lower = (labels >= tokenizer.LOWER_A) & (labels <= tokenizer.LOWER_Z)
    weight = np.where(lower, np.float32(lowercase_weight), np.float32(1.0)) * mask_f
    if to_upper == ToUpper.normalized_weighted:
        total = weight.sum(dtype=np.float64)
        if total > 0:  # rescale so the weights sum to the number of trained positions
            weight = (weight * (mask_f.sum(dtype=np.float64) / total)).astype(np.float32)
    return mask_f, weight.astype(np.float32)


def lm_loss(logits, batch: dict):
    """fp32 cross-entropy Σ loss_weight·CE / Σ loss_mask (a scalar float32 tensor).

    `logits` [B, T, V] in any dtype (upcast here); `batch` as built by `build_train_stream`.
    A batch with nothing to train gives 0 (with a graph, so backward still works).
    """
    import torch
    import torch.nn.functional as F

    labels = batch["labels"].to(logits.device)
    weight = batch["loss_weight"].to(device=logits.device, dtype=torch.float32)
    mask = batch.get("loss_mask")
    mask = (weight > 0).float() if mask is None else mask.to(logits.device, torch.float32)
    per_token = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none"
    ).view_as(weight)
    return (per_token * weight).sum() / mask.sum().clamp(min=1.0)
