"""The scheme catalog: every shipped scheme validates; bad YAML fails naming file and key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from vlm_autoquant.core.errors import UsageError
from vlm_autoquant.plan.schemes import FORMAT_BITS, load_catalog, resolve

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_catalog_file_validates(path):
    catalog = load_catalog(path)
    assert catalog
    for name, scheme in catalog.items():
        assert scheme.name == name
        assert scheme.description.strip()
        assert set(scheme.formats) <= set(FORMAT_BITS)


def test_catalog_spans_the_range():
    catalog = load_catalog(CONFIGS[0])
    bits = sorted(s.effective_bits for s in catalog.values() if s.method == "gradient")
    assert bits[0] == 8.0  # all-FP8 baseline at the minimum
    assert len({b for b in bits if 8 < b < 16}) >= 3  # aggressive, balanced, conservative
    assert any(s.method == "kl_div" for s in catalog.values())
    assert len(catalog) >= 5


def test_format_bits_match_modelopt():
    from modelopt.torch.quantization.algorithms import QuantRecipe

    for name, bits in FORMAT_BITS.items():
        assert QuantRecipe(name).compression * 16 == bits


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "cat.yaml"
    p.write_text(text)
    return p


BASE = """
schemes:
  ok-one:
    description: d
    formats: [FP8_DEFAULT_CFG]
    effective_bits: 10
    method: gradient
    num_calib_samples: 8
    num_calib_steps: 1
    num_score_steps: 1
    num_eval_samples: 0
    seq_len: 64
    batch_size: 1
    seed: 0
    disabled_layers: ["*lm_head*"]
"""


def problems_of(path: Path) -> str:
    with pytest.raises(UsageError) as exc:
        load_catalog(path)
    return exc.value.render()


def test_int_bits_accepted_and_defaults_apply(tmp_path):
    s = load_catalog(write(tmp_path, BASE))["ok-one"]
    assert s.effective_bits == 10.0 and s.excluded_from_cost == ["*lm_head*"]


def test_unknown_key_names_file_key_and_allowed(tmp_path):
    text = problems_of(write(tmp_path, BASE + "    num_calib_stepz: 3\n"))
    assert "cat.yaml" in text and "num_calib_stepz" in text and "num_calib_steps" in text


def test_wrong_type(tmp_path):
    text = problems_of(write(tmp_path, BASE.replace("seq_len: 64", 'seq_len: "64"')))
    assert "seq_len" in text and "integer" in text


def test_unknown_format_lists_allowed(tmp_path):
    text = problems_of(write(tmp_path, BASE.replace("[FP8_DEFAULT_CFG]", "[NVFP4_DEFAULT_CFG]")))
    assert "NVFP4_DEFAULT_CFG" in text and "FP8_PER_CHANNEL_PER_TOKEN_CFG" in text


def test_malformed_yaml_gives_line(tmp_path):
    text = problems_of(write(tmp_path, BASE + "  bad: [unclosed\n"))
    assert "line" in text and "malformed YAML" in text


def test_duplicate_scheme_name(tmp_path):
    dup = BASE + BASE.split("schemes:\n", 1)[1]
    text = problems_of(write(tmp_path, dup))
    assert "duplicate key 'ok-one'" in text


@pytest.mark.parametrize("name", ["../evil", "a/b", "UPPER", "dots..dots"])
def test_unsafe_scheme_names_refused(tmp_path, name):
    text = problems_of(write(tmp_path, BASE.replace("ok-one:", f"{yaml.safe_dump(name).strip()}:")))
    assert "name" in text


def test_all_problems_reported_together(tmp_path):
    text = problems_of(
        write(tmp_path, BASE.replace("seed: 0", "seed: -1").replace("batch_size: 1", "batch_size: 0"))
    )
    assert "seed" in text and "batch_size" in text and text.startswith("2 problems")


def test_overrides_are_recorded_and_validated(tmp_path):
    catalog = load_catalog(write(tmp_path, BASE))
    s = resolve(catalog, "ok-one", {"effective_bits": 12.5, "seed": None, "num_calib_steps": 1})
    assert s.effective_bits == 12.5 and s.overrides == {"effective_bits": 12.5}
    with pytest.raises(UsageError) as exc:
        resolve(catalog, "ok-one", {"num_score_steps": 0}, {"num_score_steps": "--num-score-steps"})
    assert "--num-score-steps" in exc.value.render()
    with pytest.raises(UsageError) as exc:
        resolve(catalog, "nope", {})
    assert "ok-one" in exc.value.render()


def test_a_source_tree_without_install_finds_the_repo_catalog(monkeypatch):
    """Run from a checkout on sys.path (no install, as on a bare GPU machine): configs/ beside src/."""
    from importlib import resources

    from vlm_autoquant.plan import schemes as schemes_mod

    def not_installed(name):
        raise ModuleNotFoundError(name)

    monkeypatch.setattr(resources, "files", not_installed)
    path = schemes_mod.default_catalog()
    repo_catalog = Path(__file__).resolve().parents[2] / "configs" / "schemes.yaml"
    assert Path(path) == repo_catalog
    assert "fp8-balanced-10b" in schemes_mod.load_catalog(path)
