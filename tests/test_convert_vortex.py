"""target=vortex against the public vtx package, and vortex files imported back for finetuning.

The source is a random evo2_tiny savanna checkpoint at context 512 whose hcm `h` values are signed
powers of two, so `h * decay` is exact in bf16: our float32 model, vtx's bf16-rounding loader and
the exporter then use bit-identical hcm filters, and the 1e-3 logits tolerance checks the
conversion itself (docs/model.md, "bf16 hcm rounding"). The 512-wide filters also catch the
upstream converter's bug of keeping the full width (vtx would refuse [G, 1, 512]).
"""

from __future__ import annotations

import torch
import yaml
from omegaconf import OmegaConf

from evo2_hydra.checkpoint.adapters.vortex import vortex_to_savanna
from evo2_hydra.checkpoint.loader import load_module_state_dict
from evo2_hydra.convert.run import run_convert
from evo2_hydra.errors import UserError
from evo2_hydra.model import build_model, load_into_model
from tests.ckpt_factory import make_random_savanna_checkpoint
from tests.vtx_reference import model_config, random_savanna_state_dict, run_vtx

CONTEXT = 512
TOLERANCE = 1e-3


def convert(compose_cfg, *overrides):
    cfg = compose_cfg(list(overrides), config_name="convert")
    return run_convert(OmegaConf.to_object(cfg))


def our_logits(state, cfg, context, ids):
    model = load_into_model(build_model(cfg, context), state, cfg, context)
    with torch.no_grad():
        return model(ids)


def cpu_config(path):
    """Our exported YAML, with the CPU overrides of tests/vtx_reference.py (SDPA, fp32 blocks)."""
    config = yaml.safe_load(path.read_text())
    config.update(
        use_flash_attn=False, hyena_block_dtype=torch.float32, attn_block_dtype=torch.float32
    )
    config.update(mlp_dtype=torch.float32)
    return config


def test_vortex_export_matches_vtx_and_imports_back(tmp_path, compose_cfg):
    cfg = model_config("evo2_tiny")
    # MODEL's well-conditioned random weights (logits of magnitude > 5), as a downloaded release file.
    source = tmp_path / "savanna_evo2_tiny.pt"
    torch.save(
        {"module": random_savanna_state_dict(cfg, CONTEXT, seed=4), "dp_world_size": 1}, source
    )
    out = tmp_path / "vortex"
    convert(compose_cfg, "target=vortex", f"source={source}", f"output={out}", "verify=true")
    pt, config_file = out / "evo2_tiny.pt", out / "evo2_tiny.yml"
    manifest = (out / "manifest.json").read_text()
    assert '"verify_max_logit_diff"' in manifest and pt.name in manifest

    exported = torch.load(pt, mmap=True, weights_only=True)
    n = cfg.num_layers
    assert "norm.scale" in exported and f"blocks.{n}.norm.scale" not in exported  # no hotfix needed
    assert exported["blocks.1.filter.h"].shape == (cfg.hcm_groups, 1, 128)  # sliced, not 512 wide
    assert exported["blocks.2.filter.log_poles"].shape == (cfg.hidden_size, 16, 1)
    assert (
        exported["blocks.2.filter.log_poles"].dtype
        == exported["blocks.2.filter.residues"].dtype
        == torch.float32
    )
    assert exported["blocks.0.filter.short_filter_weight"].shape == (3 * cfg.hidden_size, 1, 3)
    assert torch.equal(exported["unembed.weight"], exported["embedding_layer.weight"])
    assert not any(k.endswith(("_extra_state", "filter.t")) for k in exported)

    state, _ = load_module_state_dict(source)
    ids = torch.randint(0, 512, (1, 300), generator=torch.Generator().manual_seed(7))
    ours = our_logits(state, cfg, CONTEXT, ids)
    reference = run_vtx(dict(exported), cpu_config(config_file), ids, tmp_path / "vtx")
    assert reference.abs().max() > 5.0
    assert (ours - reference).abs().max().item() <= TOLERANCE

    # Import: the vortex file through CKPT's loader hook (128-wide filters) and through
    # target=savanna (resized to ckpt.context); both give vtx's logits.
    imported, _ = load_module_state_dict(pt)
    assert imported["sequential.3.mixer.mixer.filter.h"].shape == (cfg.hcm_groups, 128)
    assert (our_logits(imported, cfg, 128, ids) - reference).abs().max().item() <= TOLERANCE
    resaved = tmp_path / "imported"
    convert(compose_cfg, "target=savanna", f"source={pt}", f"output={resaved}", "ckpt.context=512")
    state2, _ = load_module_state_dict(resaved)
    assert (our_logits(state2, cfg, 512, ids) - reference).abs().max().item() <= TOLERANCE
    # The hcl modes come back as p/gamma/R whose product is the stored log-pole.
    p, gamma = (
        state2["sequential.4.mixer.mixer.filter.p"],
        state2["sequential.4.mixer.mixer.filter.gamma"],
    )
    assert torch.allclose(
        -torch.exp(p) * torch.exp(gamma), exported["blocks.2.filter.log_poles"][..., 0], rtol=1e-6
    )


def test_vortex_import_reads_upstream_layout_and_refuses_bad_files(tmp_path, compose_cfg):
    cfg = model_config("evo2_tiny")
    source = make_random_savanna_checkpoint(tmp_path / "src", cfg, 256, layout="single")
    out = tmp_path / "vortex"
    convert(compose_cfg, "target=vortex", f"source={source}", f"output={out}", "verify=false")
    exported = dict(torch.load(out / "evo2_tiny.pt", weights_only=True))

    # The upstream converter's output before hotfix_norm_scale.py: the final norm as pseudo-block N.
    upstream = dict(exported)
    upstream[f"blocks.{cfg.num_layers}.norm.scale"] = upstream.pop("norm.scale")
    upstream["blocks.2.mixer.mixer.filter.t"] = torch.arange(8.0).view(1, 1, 8)
    a, b = dict(vortex_to_savanna(exported)), dict(vortex_to_savanna(upstream))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    bad = dict(exported)
    bad["blocks.2.filter.log_poles"] = bad["blocks.2.filter.log_poles"].abs()
    try:
        dict(vortex_to_savanna(bad))
        raise AssertionError("positive log-poles were accepted")
    except UserError as err:
        assert "log_poles" in str(err) and "negative" in str(err)

    # A vortex file is the wrong kind of source for target=vortex; a 4-layer model does not fit it.
    for overrides, message in [
        (["target=vortex"], "already a vortex file"),
        (
            ["target=savanna", "model.num_layers=4", "model.operator_pattern=SDH*"],
            "operator pattern SDH\\*SDH\\*",
        ),
    ]:
        again = tmp_path / "again"
        try:
            convert(compose_cfg, *overrides, f"source={out / 'evo2_tiny.pt'}", f"output={again}")
            raise AssertionError(f"{overrides} was accepted")
        except UserError as err:
            assert __import__("re").search(message, str(err)), str(err)
        assert not again.exists()
