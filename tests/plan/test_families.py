"""families.py: which schemes share one search, over which formats, from which calibration."""

from __future__ import annotations

import pytest

from vlm_autoquant.core.errors import Problems

from ..conftest import SMALL_DEFAULTS

CATALOG = (
    SMALL_DEFAULTS
    + """schemes:
  b8: {description: d, effective_bits: 8}
  b10: {description: d, effective_bits: 10}
  pcpt10:
    description: d
    formats: [FP8_DEFAULT_CFG, FP8_PER_CHANNEL_PER_TOKEN_CFG]
    effective_bits: 10
  kl10: {description: d, method: kl_div, effective_bits: 10, num_score_steps: 1}
  seed7: {description: d, effective_bits: 10, seed: 7}
"""
)


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    path = tmp_path_factory.mktemp("cat") / "cat.yaml"
    path.write_text(CATALOG)
    return path


def plan(demo, catalog, tmp_path, names, single=False):
    from vlm_autoquant.plan import families
    from vlm_autoquant.plan.inputs import RunOptions
    from vlm_autoquant.plan.validate import gather

    problems = Problems()
    opts = RunOptions(model_dir=demo[0], output_dir=tmp_path / "out", calib_file=demo[1], catalog=catalog)
    inputs = gather(opts, names, {}, problems)
    assert inputs is not None, problems.items
    out = families.plan(inputs, problems, single)
    assert not problems, problems.items
    return out


def test_budgets_and_formats_share_a_search_methods_and_data_do_not(demo, catalog, tmp_path):
    fams = plan(demo, catalog, tmp_path, ["b8", "b10", "pcpt10", "kl10", "seed7"])
    by_members = {tuple(s.name for s in f.schemes): f for f in fams}
    assert set(by_members) == {("b8", "b10", "pcpt10"), ("kl10",), ("seed7",)}
    gradient = by_members[("b8", "b10", "pcpt10")]
    assert gradient.spec.formats == ("FP8_DEFAULT_CFG", "FP8_PER_CHANNEL_PER_TOKEN_CFG")
    assert gradient.spec.method == "gradient" and by_members[("kl10",)].spec.method == "kl_div"
    assert len({f.checkpoint for f in fams}) == 3
    assert all(f.checkpoint.name.startswith("group-") for f in fams)
    # the same data settings are packed once; another seed is another split
    assert gradient.data is by_members[("kl10",)].data
    assert by_members[("seed7",)].data is not gradient.data


def test_a_single_run_is_a_family_of_one_with_the_run_checkpoint(demo, catalog, tmp_path):
    (fam,) = plan(demo, catalog, tmp_path, ["b10"], single=True)
    assert [s.name for s in fam.schemes] == ["b10"] and fam.checkpoint.name == "autoquant_search.pth"
    assert fam.spec.formats == ("FP8_DEFAULT_CFG",)
    (alone,) = plan(demo, catalog, tmp_path / "again", ["b8"], single=True)
    assert alone.fingerprint == fam.fingerprint  # the budget is not part of the search


def test_calibration_is_reused_from_a_search_over_the_same_or_more_formats(demo, catalog, tmp_path):
    from vlm_autoquant.plan.families import calibration_source

    fams = plan(demo, catalog, tmp_path, ["b10", "kl10"])
    gradient, kl = fams
    assert calibration_source(kl, [gradient]) is gradient  # same formats and data: seeded
    union, kl_p = plan(demo, catalog, tmp_path / "p", ["b10", "pcpt10", "kl10"])
    assert calibration_source(kl_p, [union]) is union  # FP8 alone, from the FP8+pcpt union
    assert calibration_source(union, [kl_p]) is None  # pcpt was never calibrated there
    seed7 = plan(demo, catalog, tmp_path / "s", ["seed7"])[0]
    assert calibration_source(seed7, [gradient]) is None  # other batches
