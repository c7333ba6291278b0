"""Loss masks and weights on hand-built examples; the expected numbers are worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from evo2_hydra.config import DataConfig, Packing, ToUpper
from evo2_hydra.data.loss import control_tag_mask, lm_loss, loss_mask_and_weights
from evo2_hydra.data.stream import make_batch

EOD, PAD = 0, 1


def ids(text: str) -> np.ndarray:
    return np.frombuffer(text.encode(), dtype=np.uint8).astype(np.int64)


def pattern(mask_row) -> str:
    return "".join("x" if m else "." for m in mask_row)


@pytest.mark.parametrize(
    "labels, expected",
    [
        ("AC|d__x;p__y|GT", "..xxxxxxxxxxx.."),  # a tag between | delimiters, delimiters too
        ("ACGT|GG|TT", ".........."),  # | segments without tag characters stay
        ("A;B|CC", "xxxx.."),  # the row start is a boundary: cut-off tag at the start
        ("CC|a b", "..xxxx"),  # ... and the row end
        ("AA\x00;x|GG", "...xxx.."),  # EOD is a boundary but is never masked itself
        ("AC@GT#", "..x..x"),  # @ and # are masked wherever they are
    ],
)
def test_control_tag_mask(labels, expected):
    assert pattern(control_tag_mask(ids(labels)[None])[0]) == expected


def test_control_tag_segments_do_not_leak_across_rows():
    rows = np.stack([ids("ACG;"), ids("TTGG")])  # row 0 ends inside a tag, row 1 is clean
    assert [pattern(r) for r in control_tag_mask(rows)] == ["xxxx", "...."]


def weights(window: str, **overrides):
    w = ids(window)[None]
    args = dict(
        to_upper=ToUpper.normalized_weighted,
        lowercase_weight=0.1,
        mask_control_tags=True,
        eod_mask_loss=False,
        pad_mask_loss=False,
        mask_pad_labels=False,
    )
    args.update(overrides)
    mask, weight = loss_mask_and_weights(w[:, :-1], w[:, 1:], **args)
    return mask[0].tolist(), weight[0].tolist()


def test_normalized_weighted_rescales_to_the_mask_sum():
    # labels c g T EOD: weights .1 .1 1 1 (sum 2.2), rescaled to sum 4 (the mask sum).
    mask, weight = weights("AcgT\x00")
    assert mask == [1, 1, 1, 1]
    scale = 4 / 2.2
    assert weight == pytest.approx([0.1 * scale, 0.1 * scale, scale, scale])


def test_weighted_and_upper_modes():
    assert weights("AcgT\x00", to_upper=ToUpper.weighted)[1] == pytest.approx([0.1, 0.1, 1, 1])
    assert weights("AcgT\x00", to_upper=ToUpper.upper)[1] == [1, 1, 1, 1]
    assert weights("AcgT\x00", to_upper=ToUpper.none)[1] == [1, 1, 1, 1]


def test_input_side_eod_pad_masks_and_label_side_pad_mask():
    window = "A\x00C\x01\x01"  # inputs A EOD C PAD, labels EOD C PAD PAD
    off = dict(to_upper=ToUpper.none)
    assert weights(window, **off)[0] == [1, 1, 1, 1]
    assert weights(window, eod_mask_loss=True, **off)[0] == [1, 0, 1, 1]
    assert weights(window, eod_mask_loss=True, pad_mask_loss=True, **off)[0] == [1, 0, 1, 0]
    # padded packing: a PAD label is never a target (position 2: input C, label PAD)
    assert weights(window, mask_pad_labels=True, **off)[0] == [1, 1, 0, 0]


def test_tags_can_be_switched_off():
    assert weights("A;B|CC", mask_control_tags=False, to_upper=ToUpper.none)[0] == [1] * 5
    assert weights("A;B|CC", to_upper=ToUpper.none)[0] == [0, 0, 0, 1, 1]


def test_make_batch_upper_cases_inputs_and_labels_in_padded_mode():
    data = DataConfig(packing=Packing.padded, to_upper=ToUpper.normalized_weighted)
    window = np.stack([ids("1acGT\x00\x01\x01\x01")])
    batch = make_batch(window, data)
    assert bytes(batch["input_ids"][0].tolist()) == b"1ACGT\x00\x01\x01"
    assert bytes(batch["labels"][0].tolist()) == b"ACGT\x00\x01\x01\x01"
    # labels a c G T EOD (trained), PAD PAD PAD (masked): weights .1 .1 1 1 1 -> sum 3.2 -> 5
    assert batch["loss_mask"][0].tolist() == [1, 1, 1, 1, 1, 0, 0, 0]
    scale = 5 / 3.2
    expected = [0.1 * scale, 0.1 * scale, scale, scale, scale, 0, 0, 0]
    assert batch["loss_weight"][0].tolist() == pytest.approx(expected)


def _logits_with_known_ce(labels: torch.Tensor, boost: list[float], vocab: int = 512):
    """Logits 0 except `boost` at the label: CE = log(e^b + vocab - 1) - b."""
    logits = torch.zeros(*labels.shape, vocab, dtype=torch.bfloat16)
    for t, b in enumerate(boost):
        logits[0, t, labels[0, t]] = b
    ces = [math.log(math.exp(b) + vocab - 1) - b for b in boost]
    return logits, ces


@pytest.mark.parametrize("mode", [ToUpper.normalized_weighted, ToUpper.weighted, ToUpper.upper])
def test_lm_loss_matches_hand_computation(mode):
    data = DataConfig(packing=Packing.padded, to_upper=mode)
    batch = make_batch(np.stack([ids("AcgT\x00\x01")]), data)  # labels c g T EOD PAD
    boost = [1.0, 2.0, 3.0, 4.0, 5.0]  # bf16-exact values
    logits, ce = _logits_with_known_ce(batch["labels"], boost)
    loss = lm_loss(logits, batch)
    assert loss.dtype == torch.float32
    w = [0.1, 0.1, 1.0, 1.0]  # PAD label masked
    if mode == ToUpper.normalized_weighted:
        want = sum(wi * c for wi, c in zip(w, ce)) / sum(w)
    elif mode == ToUpper.weighted:
        want = sum(wi * c for wi, c in zip(w, ce)) / 4
    else:
        want = sum(ce[:4]) / 4
    assert loss.item() == pytest.approx(want, rel=1e-5)


def test_lm_loss_with_nothing_to_train_is_zero_and_differentiable():
    data = DataConfig(packing=Packing.padded)
    batch = make_batch(np.stack([ids("A\x01\x01")]), data)
    logits = torch.randn(1, 2, 512, requires_grad=True)
    loss = lm_loss(logits, batch)
    loss.backward()
    assert loss.item() == 0.0 and logits.grad is not None
