"""Our float32 logits against the public vortex implementation (PyPI `vtx` 1.1.0) on CPU.

A random evo2_tiny checkpoint in the savanna layout is loaded into our model and, through a
savanna -> vortex exporter (evo2_hydra/checkpoint/adapters/vortex.py), into vtx's own loader; both run in
float32 on the same 300-token input and must agree within 1e-3 absolute on every logit.

How the bf16 hcm rounding is handled: savanna, the vortex converter and vtx's loader all hold the
hcm filter product `h[:, :128] * decay[:, :128]` in bf16, while a float32 model would form it in
fp32 (docs/model.md, "bf16 hcm rounding"). Two tests:
- `test_logits_match_vtx`: the checkpoint's hcm `h` values are signed powers of two, so the product
  of two bf16 numbers is exact in bf16 and both sides use bit-identical filters whatever dtype they
  form it in; the comparison checks the math, not a rounding convention.
- `test_bf16_hcm_product_is_rounded_like_savanna`: arbitrary bf16 `h`; our float32 model remembers
  the file's bf16 dtype and forms the product in bf16 (`HcmOperator.product_dtype`), so it still
  matches vtx, and forming it in fp32 instead is shown to miss the tolerance.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from evo2_hydra.model import build_model, load_into_model
from evo2_hydra.model.layers import HcmOperator
from tests.vtx_reference import (
    model_config,
    random_savanna_state_dict,
    run_vtx,
    savanna_to_vortex,
    vortex_config,
)

CONTEXT = 512
TOLERANCE = 1e-3


@pytest.mark.parametrize("rope_scaling_factor", [1.0, 4.0])
def test_logits_match_vtx(tmp_path, rope_scaling_factor):
    cfg = model_config("evo2_tiny", rope_scaling_factor=rope_scaling_factor)
    state = random_savanna_state_dict(cfg, CONTEXT, seed=3, dtype=torch.bfloat16)
    input_ids = torch.randint(0, 512, (1, 300), generator=torch.Generator().manual_seed(7))

    ours_model = load_into_model(build_model(cfg, CONTEXT), state, cfg, CONTEXT)
    with torch.no_grad():
        ours = ours_model(input_ids)
    reference = run_vtx(savanna_to_vortex(state, cfg), vortex_config(cfg), input_ids, tmp_path)

    assert ours.dtype == torch.float32 and ours.shape == reference.shape == (1, 300, 512)
    assert reference.abs().max() > 5.0  # the random model is far from trivial
    diff = (ours - reference).abs().max().item()
    assert diff <= TOLERANCE, f"max |ours - vtx| = {diff:.2e}"

    if rope_scaling_factor != 1.0:
        # Sensitivity: the same weights with the RoPE scaling ignored must fail the tolerance.
        unscaled = dataclasses.replace(cfg, rope_scaling_factor=1.0)
        wrong_model = load_into_model(build_model(unscaled, CONTEXT), state, unscaled, CONTEXT)
        with torch.no_grad():
            wrong = wrong_model(input_ids)
        assert (wrong - reference).abs().max().item() > 100 * TOLERANCE


def test_bf16_hcm_product_is_rounded_like_savanna(tmp_path):
    cfg = model_config("evo2_tiny")
    state = random_savanna_state_dict(cfg, CONTEXT, seed=4, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    for key in state:
        if key.endswith("mixer.mixer.filter.h"):  # not powers of two: bf16 rounding matters
            state[key] = (torch.randn(state[key].shape, generator=g) * 0.2).bfloat16()
    input_ids = torch.randint(0, 512, (1, 300), generator=torch.Generator().manual_seed(8))

    model = load_into_model(build_model(cfg, CONTEXT), state, cfg, CONTEXT)
    hcm = [m for m in model.modules() if isinstance(m, HcmOperator)]
    assert hcm and all(m.product_dtype == torch.bfloat16 for m in hcm)
    assert model.sequential[3].mixer.mixer.filter.h.dtype == torch.float32
    reference = run_vtx(savanna_to_vortex(state, cfg), vortex_config(cfg), input_ids, tmp_path)
    with torch.no_grad():
        ours = model(input_ids)
    assert (ours - reference).abs().max().item() <= TOLERANCE

    for m in hcm:  # the float32 product (what a naive fp32 model does) misses the tolerance
        m.source_dtype = None
    with torch.no_grad():
        fp32_product = model(input_ids)
    assert (fp32_product - reference).abs().max().item() > 10 * TOLERANCE
