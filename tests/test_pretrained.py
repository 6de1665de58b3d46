"""`save_pretrained` / `from_pretrained`: LCAAM alone on disk, for every adapter."""

from __future__ import annotations

import json
import os
import pickle
import warnings
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
from helpers import assert_unchanged, snapshot, tiny_vit
from torch import nn

import lcaam_patch
from lcaam_patch.adapters import registry
from lcaam_patch.errors import (
    AlreadyPatchedError,
    InvalidOptionError,
    NotPatchedError,
    StateDictError,
    UnknownAdapterError,
)

E, H = 16, 2


def perturb(model: nn.Module) -> None:
    """Move every generator away from identity, as training would."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if lcaam_patch.is_lcaam_key(name):
                param.add_(torch.randn_like(param) * 0.5)


def fresh_copy(source: nn.Module, build) -> nn.Module:
    """An unpatched model from `build` holding the upstream weights of `source`."""
    model = build()
    upstream = {k: v for k, v in source.state_dict().items() if not lcaam_patch.is_lcaam_key(k)}
    model.load_state_dict(upstream)
    return model.eval()


def encoder() -> nn.Module:
    layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=32, batch_first=True)
    return nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False).eval()


def owners(model: nn.Module) -> list[str]:
    return [path for path, module, _ in lcaam_patch.patched_sites(model) if "lcaam" in module._modules]


def saved(tmp_path: Path, **options) -> tuple[nn.Module, Path]:
    """A tiny ViT patched with `options`, trained away from identity, saved to tmp_path."""
    model = lcaam_patch.apply(tiny_vit(), **options).eval()
    perturb(model)
    lcaam_patch.save_pretrained(model, tmp_path / "lcaam")
    return model, tmp_path / "lcaam"


def edit_json(directory: Path, change) -> None:
    path = directory / "lcaam.json"
    document = json.loads(path.read_text())
    change(document)
    path.write_text(json.dumps(document))


VIT_OPTIONS = [
    pytest.param({}, id="multilayer"),
    pytest.param({"mode": "global"}, id="global"),
    pytest.param({"generator": "lowrank", "rank": 2}, id="lowrank"),
    pytest.param({"depth": 2, "hidden": 8, "fusion": "add", "activation": "none"}, id="deep-add"),
    pytest.param({"preset": "timm_vit"}, id="preset"),
]


@pytest.mark.parametrize("options", VIT_OPTIONS)
def test_timm_vit_round_trip_gives_identical_outputs(tmp_path, options):
    source, directory = saved(tmp_path, **options)
    x = torch.randn(2, 3, 16, 16)
    expected = source(x)
    model = lcaam_patch.from_pretrained(fresh_copy(source, tiny_vit), directory)
    assert [p for p, _, _ in lcaam_patch.patched_sites(model)] == ["blocks.0.attn", "blocks.1.attn"]
    assert owners(model) == owners(source)
    assert torch.equal(model(x), expected)
    plain = fresh_copy(source, tiny_vit)
    assert not torch.allclose(plain(x), expected)


def test_global_mode_keeps_one_generator_per_stack(tmp_path):
    source, directory = saved(tmp_path, mode="global")
    model = lcaam_patch.from_pretrained(fresh_copy(source, tiny_vit), directory)
    assert owners(model) == ["blocks.0.attn"]
    stacks = {site.stack.leader for _, _, site in lcaam_patch.patched_sites(model)}
    assert stacks == {"blocks.0.attn"}


def test_transformer_encoder_round_trip(tmp_path):
    source = lcaam_patch.apply(encoder(), max_tokens=6)
    perturb(source)
    lcaam_patch.save_pretrained(source, tmp_path)
    x = torch.randn(2, 6, E)
    model = lcaam_patch.from_pretrained(fresh_copy(source, encoder), tmp_path)
    assert torch.equal(model(x), source(x))
    config = json.loads((tmp_path / "lcaam.json").read_text())["config"]
    assert config["max_tokens"] == 6
    with pytest.raises(lcaam_patch.SequenceTooLongError):
        model(torch.randn(1, 7, E))


def test_cross_attention_round_trip_keeps_both_bounds(tmp_path):
    source = lcaam_patch.apply(nn.MultiheadAttention(E, H, batch_first=True), max_tokens=4, max_kv_tokens=9)
    perturb(source)
    lcaam_patch.save_pretrained(source, tmp_path)
    q, kv = torch.randn(2, 4, E), torch.randn(2, 9, E)
    model = lcaam_patch.from_pretrained(
        fresh_copy(source, lambda: nn.MultiheadAttention(E, H, batch_first=True)), tmp_path
    )
    assert torch.equal(model(q, kv, kv)[0], source(q, kv, kv)[0])
    geometry = lcaam_patch.patched_sites(model)[0][2].geometry
    assert (geometry.max_q_tokens, geometry.max_kv_tokens, geometry.kind) == (4, 9, "cross")


def test_transformers_llama_round_trip(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)

    def llama() -> nn.Module:
        options = dict(config, num_key_value_heads=2, max_position_embeddings=64, attn_implementation="sdpa")
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**options)).eval()

    source = lcaam_patch.apply(llama(), max_kv_tokens=16)
    perturb(source)
    lcaam_patch.save_pretrained(source, tmp_path)
    saved_config = json.loads((tmp_path / "lcaam.json").read_text())["config"]
    assert (saved_config["max_tokens"], saved_config["max_kv_tokens"]) == (None, 16)
    ids = torch.randint(0, 64, (2, 12))
    model = lcaam_patch.from_pretrained(fresh_copy(source, llama), tmp_path)
    assert torch.equal(model(ids).logits, source(ids).logits)
    assert not torch.allclose(fresh_copy(source, llama)(ids).logits, source(ids).logits)


def test_only_lcaam_weights_are_written(tmp_path):
    source, directory = saved(tmp_path)
    assert sorted(os.listdir(directory)) == ["lcaam.json", "lcaam.safetensors"]
    tensors = safetensors.torch.load_file(directory / "lcaam.safetensors")
    assert set(tensors) == set(lcaam_patch.lcaam_state_dict(source))
    assert set(tensors) == {f"blocks.{i}.attn.lcaam.layers.0.{p}" for i in (0, 1) for p in ("weight", "bias")}
    for key, value in tensors.items():
        assert torch.equal(value, source.state_dict()[key])


def test_json_records_options_sites_adapters_and_versions(tmp_path):
    model = lcaam_patch.apply(tiny_vit(), preset="timm_vit", depth=2)
    lcaam_patch.save_pretrained(model, tmp_path, preset="timm_vit", depth=2)
    document = json.loads((tmp_path / "lcaam.json").read_text())
    assert document["library_version"] == lcaam_patch.__version__
    assert document["preset"] == "timm_vit"
    assert document["config"] == {
        **{f.name: f.default for f in lcaam_patch.LCAAMConfig.__dataclass_fields__.values()},
        "depth": 2,
    }
    assert document["adapters"] == {"timm": {"distribution": "timm", "version": timm.__version__}}
    assert document["sites"][1] == {
        "path": "blocks.1.attn",
        "adapter": "timm",
        "geometry": {"embed_dim": 32, "max_q_tokens": 17, "max_kv_tokens": 17, "kind": "self", "kv_embed_dim": None},
        "owns_generator": True,
    }
    assert document["weights"]["blocks.0.attn.lcaam.layers.1.weight"] == {"dtype": "torch.float32", "shape": [17, 32]}


def test_the_options_apply_patched_with_are_recorded_and_re_create_it(tmp_path):
    model = lcaam_patch.apply(tiny_vit(), targets="blocks.1.*", depth=3, hidden=8, init="default")
    lcaam_patch.save_pretrained(model, tmp_path)
    config = json.loads((tmp_path / "lcaam.json").read_text())["config"]
    assert (config["targets"], config["depth"], config["hidden"], config["init"]) == (
        ["blocks.1.*"],
        3,
        8,
        "default",
    )
    loaded = lcaam_patch.from_pretrained(fresh_copy(model, tiny_vit), tmp_path)
    assert [p for p, _, _ in lcaam_patch.patched_sites(loaded)] == ["blocks.1.attn"]


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(4, 12)


class ToyAdapter(lcaam_patch.Adapter):
    """Its sites see one register token more than the `max_tokens` given (default 4), so
    the bound cannot be read back off the geometry."""

    name = "toy"

    def attention_types(self):
        return (Toy,)

    def geometry(self, module, path, root, config):
        bound = (config.max_tokens or 4) + 1
        return lcaam_patch.SiteGeometry(4, bound, bound, "self")

    def forward(self, module, site, x):
        q, k, v = module.qkv(x).unsqueeze(1).chunk(3, dim=-1)
        out, _ = site.attend(module, x, q, k, v, scale=1.0)
        return out.squeeze(1)


def test_options_the_geometry_cannot_tell_are_recorded(tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "_ADAPTERS", dict(registry.registered_adapters()))
    lcaam_patch.register_adapter(ToyAdapter())
    source = lcaam_patch.apply(nn.Sequential(Toy(), Toy()), max_tokens=7)
    perturb(source)
    lcaam_patch.save_pretrained(source, tmp_path)
    assert json.loads((tmp_path / "lcaam.json").read_text())["config"]["max_tokens"] == 7
    x = torch.randn(2, 8, 4)
    model = lcaam_patch.from_pretrained(fresh_copy(source, lambda: nn.Sequential(Toy(), Toy())), tmp_path)
    assert torch.equal(model(x), source(x))
    assert lcaam_patch.patched_sites(model)[0][2].geometry.max_kv_tokens == 8


def test_a_model_pickled_by_0_1_0_is_refused_with_how_to_re_apply(tmp_path, monkeypatch):
    source = lcaam_patch.apply(tiny_vit(), depth=2).eval()
    perturb(source)
    # 0.1.0 sites had no config: pickle them without it
    monkeypatch.setattr(
        lcaam_patch.LCAAMSite, "__getstate__", lambda site: {k: v for k, v in vars(site).items() if k != "config"}
    )
    model = pickle.loads(pickle.dumps(source))
    assert all(site.config is None for _, _, site in lcaam_patch.patched_sites(model))
    with pytest.raises(StateDictError, match=r"pickled by lcaam-patch 0.1.0\); re-apply them"):
        lcaam_patch.save_pretrained(model, tmp_path / "lcaam")
    assert not tmp_path.joinpath("lcaam").exists()
    state = lcaam_patch.lcaam_state_dict(model)
    lcaam_patch.remove(model)
    lcaam_patch.apply(model, depth=2)
    lcaam_patch.load_lcaam_state_dict(model, state)
    lcaam_patch.save_pretrained(model, tmp_path / "lcaam")
    loaded = lcaam_patch.from_pretrained(fresh_copy(source, tiny_vit), tmp_path / "lcaam")
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(loaded(x), source(x))


def test_sites_patched_by_several_applies_are_refused(tmp_path):
    model = encoder()
    lcaam_patch.apply(model.layers[0], max_tokens=6)
    lcaam_patch.apply(model.layers[1], max_tokens=8)
    with pytest.raises(StateDictError, match="several apply calls with different options"):
        lcaam_patch.save_pretrained(model, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_options_that_do_not_re_create_the_model_are_refused(tmp_path):
    model = lcaam_patch.apply(tiny_vit(), depth=2)
    with pytest.raises(InvalidOptionError, match=r"options \['depth'\] differ"):
        lcaam_patch.save_pretrained(model, tmp_path, depth=3)
    with pytest.raises(InvalidOptionError, match="do not re-create"):
        lcaam_patch.save_pretrained(model, tmp_path, depth=2, targets="blocks.0.*")
    assert not tmp_path.joinpath("lcaam.json").exists()


def test_saving_leaves_the_model_as_it_was(tmp_path):
    model = lcaam_patch.apply(tiny_vit(), mode="global").eval()
    perturb(model)
    x = torch.randn(1, 3, 16, 16)
    before, expected = snapshot(model), model(x)
    lcaam_patch.save_pretrained(model, tmp_path)
    assert_unchanged(model, before)
    assert torch.equal(model(x), expected)


def test_save_refuses_an_unpatched_model(tmp_path):
    with pytest.raises(NotPatchedError, match="apply"):
        lcaam_patch.save_pretrained(tiny_vit(), tmp_path)


def test_save_refuses_generators_without_values(tmp_path):
    with torch.device("meta"), pytest.warns(UserWarning, match="meta device"):
        model = lcaam_patch.apply(tiny_vit())
    with pytest.raises(StateDictError, match="meta device; materialise the model"):
        lcaam_patch.save_pretrained(model, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_weights_keep_their_dtype_and_load_into_the_generators_dtype(tmp_path):
    source = lcaam_patch.apply(tiny_vit())
    perturb(source)
    source.to(torch.float16)
    lcaam_patch.save_pretrained(source, tmp_path)
    tensors = safetensors.torch.load_file(tmp_path / "lcaam.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.float16}
    model = lcaam_patch.from_pretrained(tiny_vit(), tmp_path)
    weight = model.blocks[0].attn.lcaam.layers[0].weight
    assert weight.dtype == torch.float32
    assert torch.equal(weight, source.blocks[0].attn.lcaam.layers[0].weight.float())


def refused(model: nn.Module, directory: Path, error: type[Exception], match: str) -> None:
    """from_pretrained raises `error` matching `match` and leaves `model` as it was."""
    x = torch.randn(1, 3, *model.patch_embed.img_size) if isinstance(model, timm.models.VisionTransformer) else None
    before, patched = snapshot(model), lcaam_patch.is_patched(model)
    expected = model.eval()(x) if x is not None else None
    with pytest.raises(error, match=match):
        lcaam_patch.from_pretrained(model, directory)
    assert_unchanged(model, before)
    assert lcaam_patch.is_patched(model) == patched
    if x is not None:
        assert torch.equal(model(x), expected)


@pytest.mark.parametrize(
    ("build", "match"),
    [
        pytest.param(lambda: tiny_vit(depth=3), r"would also patch \['blocks.2.attn'\].*Load it into", id="extra"),
        pytest.param(lambda: tiny_vit(depth=1), r"no supported attention module at \['blocks.1.attn'\]", id="missing"),
        pytest.param(lambda: tiny_vit(embed_dim=48), r"embed_dim=48.*was saved as timm.*embed_dim=32", id="width"),
        pytest.param(lambda: tiny_vit(img_size=32), r"max_q_tokens=65.*max_q_tokens=17", id="tokens"),
        pytest.param(encoder, r"VisionTransformer was saved, this is .*TransformerEncoder", id="architecture"),
    ],
)
def test_a_model_that_does_not_fit_is_refused_untouched(tmp_path, build, match):
    _, directory = saved(tmp_path)
    refused(build(), directory, StateDictError, match)


def test_an_already_patched_model_is_refused_untouched(tmp_path):
    _, directory = saved(tmp_path)
    refused(lcaam_patch.apply(tiny_vit()), directory, AlreadyPatchedError, "remove.*load_lcaam_state_dict")


def test_a_directory_without_the_files_is_refused(tmp_path):
    refused(tiny_vit(), tmp_path, StateDictError, "lacks lcaam.json, lcaam.safetensors; give a directory written by")
    _, directory = saved(tmp_path)
    (directory / "lcaam.safetensors").unlink()
    refused(tiny_vit(), directory, StateDictError, "lacks lcaam.safetensors")


@pytest.mark.parametrize(
    ("corrupt", "match"),
    [
        pytest.param(lambda d: d.joinpath("lcaam.json").write_text("{not json"), "not JSON", id="syntax"),
        pytest.param(lambda d: edit_json(d, lambda j: j.pop("sites")), "'sites' must be a JSON array", id="sites"),
        pytest.param(lambda d: edit_json(d, lambda j: j["config"].update(mode="both")), "mode='both'", id="option"),
        pytest.param(
            lambda d: edit_json(d, lambda j: j["sites"][0]["geometry"].pop("kind")), "a site lacks", id="geometry"
        ),
        pytest.param(lambda d: d.joinpath("lcaam.safetensors").write_bytes(b"\0" * 9), "not a readable", id="weights"),
    ],
)
def test_corrupt_files_are_refused_untouched(tmp_path, corrupt, match):
    _, directory = saved(tmp_path)
    corrupt(directory)
    refused(tiny_vit(), directory, StateDictError, f"{match}.*save_pretrained")


def test_a_newer_format_asks_for_an_upgrade(tmp_path):
    _, directory = saved(tmp_path)
    edit_json(directory, lambda j: j.update(format_version=2))
    refused(tiny_vit(), directory, StateDictError, "upgrade lcaam_patch")


def test_an_unregistered_adapter_is_refused_untouched(tmp_path):
    _, directory = saved(tmp_path)

    def rename(document):
        for site in document["sites"]:
            site["adapter"] = "elsewhere"
        document["adapters"] = {"elsewhere": {"distribution": "elsewhere-lcaam", "version": "1.0"}}

    edit_json(directory, rename)
    refused(tiny_vit(), directory, UnknownAdapterError, "install elsewhere-lcaam")


def rewrite_weights(directory: Path, change) -> None:
    """Change the saved tensors and record them in the JSON, as a consistent bad save."""
    path = directory / "lcaam.safetensors"
    tensors = {k: change(k, v) for k, v in safetensors.torch.load_file(path).items()}
    safetensors.torch.save_file(tensors, path)

    def record(document):
        document["weights"] = {k: {"dtype": str(v.dtype), "shape": list(v.shape)} for k, v in tensors.items()}

    edit_json(directory, record)


def test_weights_of_the_wrong_dtype_or_shape_are_refused_untouched(tmp_path):
    _, directory = saved(tmp_path)
    rewrite_weights(directory, lambda k, v: v.to(torch.int32))
    refused(tiny_vit(), directory, StateDictError, "dtype torch.int32; generator weights are floating point")
    _, directory = saved(tmp_path)
    rewrite_weights(directory, lambda k, v: v[:-1])
    refused(tiny_vit(), directory, StateDictError, r"has shape \(16,?.*expects \(17")


def test_non_finite_weights_are_refused_untouched(tmp_path):
    for bad in (float("nan"), float("inf")):
        _, directory = saved(tmp_path)
        rewrite_weights(directory, lambda k, v, bad=bad: torch.full_like(v, bad))
        refused(tiny_vit(), directory, StateDictError, "NaN or infinite values")


def test_weights_that_disagree_with_the_json_are_refused_untouched(tmp_path):
    _, directory = saved(tmp_path)
    path = directory / "lcaam.safetensors"
    tensors = safetensors.torch.load_file(path)
    tensors["blocks.0.attn.lcaam.layers.0.bias"] = tensors["blocks.0.attn.lcaam.layers.0.bias"][:3]
    safetensors.torch.save_file(tensors, path)
    refused(tiny_vit(), directory, StateDictError, "not what lcaam.json records.*different saves")
    del tensors["blocks.0.attn.lcaam.layers.0.bias"]
    safetensors.torch.save_file(tensors, path)
    refused(tiny_vit(), directory, StateDictError, "disagree on the weights")


def test_other_versions_are_warned_about_not_refused(tmp_path):
    source, directory = saved(tmp_path)

    def age(document):
        document["library_version"] = "0.0.1"
        document["adapters"]["timm"]["version"] = "0.9.0"

    edit_json(directory, age)
    with pytest.warns(UserWarning) as seen:
        model = lcaam_patch.from_pretrained(fresh_copy(source, tiny_vit), directory)
    messages = [str(w.message) for w in seen]
    assert any("lcaam_patch 0.0.1" in m for m in messages)
    assert any(f"timm==0.9.0 (adapter 'timm'); {timm.__version__} is installed" in m for m in messages)
    x = torch.randn(1, 3, 16, 16)
    assert torch.equal(model(x), source(x))


def test_same_versions_load_without_warning(tmp_path):
    source, directory = saved(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lcaam_patch.from_pretrained(fresh_copy(source, tiny_vit), directory)


def test_inspect_patches_from_a_saved_directory(tmp_path, capsys):
    from lcaam_patch.cli import main

    _, directory = saved(tmp_path, mode="global")
    command = ["inspect", "helpers:tiny_vit", "--input-shape", "1,3,16,16", "--lcaam-dir", str(directory)]
    assert main(command) == 0
    assert "shared (blocks.0.attn)" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exited:
        main([*command, "--depth", "2"])
    assert exited.value.code == 2
    assert "--lcaam-dir brings its own options and weights" in capsys.readouterr().err


def test_lcaam_directory_is_much_smaller_than_the_full_checkpoint(tmp_path):
    _, directory = saved(tmp_path)
    lcaam_bytes = sum(f.stat().st_size for f in directory.iterdir())
    full = lcaam_patch.apply(tiny_vit())
    torch.save(full.state_dict(), tmp_path / "full.pt")
    assert lcaam_bytes * 5 < (tmp_path / "full.pt").stat().st_size
