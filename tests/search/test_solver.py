"""ModelOpt's solver at full-size layer shapes, on the meta device: real costs, synthetic scores.

The model is built on the meta device (no weights). ModelOpt's `auto_quantize` runs for real
through `autoquant.search` and `autoquant.solve` (quantizer insertion, grouping, disabled layers, cost
exclusion, candidate stats, the LP); only calibration (a no-op) and scoring (seeded random
scores) are replaced, so the solver sees exactly the costs a full-size run gives it.

Root cause reproduced here: ModelOpt 0.47 passes the budget to CBC in weight elements (the 3B's
8-bit bound is 1,387,266,048) and CBC's feasibility tolerance is absolute (1e-7), below one
double ulp at that size; a bound met with equality (every searched layer FP8: `fp8-all-8b`)
is then "infeasible". The tiny demo model (costs ~1e5) never shows it.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from modelopt.torch.opt.searcher import LPS
from modelopt.torch.quantization import algorithms as alg
from transformers import Qwen2Config

from vlm_autoquant.model.demo import QWEN25_VL_3B
from vlm_autoquant.model.lm import linear_numels, meta_model
from vlm_autoquant.plan import cost, families
from vlm_autoquant.plan.schemes import Scheme, default_catalog, load_catalog
from vlm_autoquant.search import autoquant
from vlm_autoquant.search.spec import SearchCheckpoint

ROOT = Path(__file__).resolve().parents[2]
CATALOG = load_catalog(default_catalog())
FP8_BITS = 8  # every catalog format is an 8-bit FP8 format

# Released Qwen2.5-VL text configs (the 3B from the demo builder; the others untied).
_BIG = dict(vocab_size=152064, tie_word_embeddings=False)
SHAPES = {
    "3b": dict(
        {
            k: v
            for k, v in QWEN25_VL_3B["text"].items()
            if k
            in (
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
                "vocab_size",
            )
        },
        tie_word_embeddings=True,
    ),
    "7b": dict(
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        **_BIG,
    ),
    "32b": dict(
        hidden_size=5120,
        intermediate_size=27648,
        num_hidden_layers=64,
        num_attention_heads=40,
        num_key_value_heads=8,
        **_BIG,
    ),
    "72b": dict(
        hidden_size=8192,
        intermediate_size=29568,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        **_BIG,
    ),
}


def meta_lm(size: str) -> torch.nn.Module:
    return meta_model(Qwen2Config(**SHAPES[size], use_cache=False))


@pytest.fixture
def synthetic_search(monkeypatch):
    """Calibration sees no data; scoring writes seeded scores spanning six decades."""
    import modelopt.torch.quantization.model_quant as mq

    real_calibrate = mq.calibrate

    def no_calibration(model, algorithm="max", forward_loop=None):
        # ModelOpt's calibration mode, run over no data (ModelOpt pops the mode it adds).
        return real_calibrate(model, algorithm=algorithm, forward_loop=lambda m: None)

    def synthetic_scores(self) -> None:
        rng = random.Random(0)
        none = alg.QuantRecipe(quant_cfg=None)
        for _, hp in alg.named_hparams(self.model, unique=True):
            if isinstance(hp, alg.QuantRecipeHparam):
                for recipe in hp.choices:
                    for sm in hp.score_modules:
                        hp._importance_dict[recipe][sm] = (
                            None if recipe == none else torch.tensor(10 ** rng.uniform(-3, 3))
                        )

    monkeypatch.setattr(mq, "calibrate", no_calibration)
    for cls in (alg.AutoQuantizeGradientSearcher, alg.AutoQuantizeKLDivSearcher):
        monkeypatch.setattr(cls, "estimate_sensitivity_scores", synthetic_scores)


def run_search(size: str, scheme: Scheme, tmp_path: Path):
    model = meta_lm(size)
    found = autoquant.search(
        model,
        families.spec_of([scheme]),
        [None],
        SearchCheckpoint(tmp_path / f"{size}.pth", lambda p, stage, tmp=None: ""),
    )
    return found, model


def solve(size: str, scheme: Scheme, tmp_path: Path):
    found, model = run_search(size, scheme, tmp_path)
    return autoquant.solve(model, found, list(scheme.formats), scheme.effective_bits), model


def chosen_bits(result, numels: dict[str, int]) -> dict[str, int]:
    """Per-linear bits of the recipe ModelOpt chose (a group's format applies to all members)."""
    bits = {name: 16 for name in numels}
    for g in result.groups:
        for name in g.module_names:
            bits[name] = 16 if g.chosen == "BF16" else FP8_BITS
    return bits


def min_step_bits(result, total: int) -> float:
    """The smallest change in effective bits one group's choice can make."""
    steps = [max(g.costs.values()) - min(g.costs.values()) for g in result.groups]
    return min(s for s in steps if s > 0) / total * 16


def check_solution(size: str, scheme: Scheme, result, model: torch.nn.Module) -> float:
    numels = linear_numels(model)
    excluded = scheme.excluded_from_cost
    bits = chosen_bits(result, numels)
    achieved = cost.effective_bits(numels, bits, excluded)
    low = cost.bits_range(numels, list(scheme.disabled_layers), excluded, FP8_BITS).low
    target = scheme.effective_bits
    assert achieved <= target + autoquant.SOLVER_BITS_TOLERANCE, (size, scheme.name, achieved)
    assert achieved >= low - 1e-9
    assert all(bits[n] == 16 for n in numels if cost.matches(n, list(scheme.disabled_layers)))
    # Every score is positive and BF16 scores 0: an optimal recipe leaves less budget unused
    # than the smallest group would take (else keeping that group BF16 would score lower).
    total = sum(k for n, k in numels.items() if not cost.matches(n, excluded))
    assert target - achieved < min_step_bits(result, total), (size, scheme.name, achieved)
    return achieved


def test_3b_minimum_bound_is_infeasible_to_plain_modelopt_lp(synthetic_search, tmp_path):
    """The cause, at the 3B's real costs: the same LP fails unscaled and solves normalised."""
    found, model = run_search("3b", CATALOG["fp8-conservative-12b"], tmp_path)
    stats = list(found.stats.values())
    costs = [s["costs"] for s in stats]
    scores = [s["scores"] for s in stats]
    total = sum(s["uncompressed_cost"] for s in stats)
    bound = total * 8.0 / 16  # ModelOpt's run_search: max_weight_size = total * bits / 16
    minimum = sum(min(c) for c in costs)
    assert total == sum(k for n, k in linear_numels(model).items() if "lm_head" not in n)
    assert minimum == bound == 1_387_266_048  # met with equality: all 144 groups FP8

    def status(lps_cls) -> str:
        lps = lps_cls(
            name="AutoQuantize",
            constraints={"w": (None, bound)},
            constraints_to_candidate_costs={"w": costs},
            candidate_scores=scores,
        )
        return lps()[1]

    plain = status(LPS)
    if plain == "Optimal":
        pytest.skip(
            "this ModelOpt/CBC build solves the unscaled 3B bound: the cause is gone "
            "upstream (NormalisedLPS is then harmless but unneeded)"
        )
    assert plain == "Infeasible"
    assert status(autoquant.NormalisedLPS) == "Optimal"


def test_fp8_all_8b_solves_at_3b_shapes(synthetic_search, tmp_path):
    """Fails without the fix: RunFailed('ModelOpt found no recipe within 8.0 effective bits').
    Also fp8-all-8b's case of the catalog test below, which is parametrized without it."""
    scheme = CATALOG["fp8-all-8b"]
    result, model = solve("3b", scheme, tmp_path)
    achieved = check_solution("3b", scheme, result, model)
    assert abs(result.achieved_bits - achieved) < 1e-9
    bits = chosen_bits(result, linear_numels(model))
    assert sum(1 for n, b in bits.items() if b == FP8_BITS) == 252  # 36 layers x 7 linears


# fp8-all-8b is solved, with the same checks and more, by the test above.
@pytest.mark.parametrize("name", sorted(set(CATALOG) - {"fp8-all-8b"}))
def test_every_catalog_scheme_solves_at_3b_shapes(synthetic_search, tmp_path, name):
    scheme = CATALOG[name]
    result, model = solve("3b", scheme, tmp_path)
    achieved = check_solution("3b", scheme, result, model)
    assert abs(result.achieved_bits - achieved) < 1e-9
    if len(scheme.formats) > 1:  # pcpt: each searched group chose among all its formats
        groups = [g for g in result.groups if len(g.scores) > 1]
        assert groups and all(len(g.scores) == len(scheme.formats) + 1 for g in groups)


@pytest.mark.parametrize("size", ["7b", "32b", "72b"])
def test_larger_qwen25_vl_shapes_solve_at_their_minimum(synthetic_search, tmp_path, size):
    scheme = CATALOG["fp8-all-8b"]
    result, model = solve(size, scheme, tmp_path)
    assert check_solution(size, scheme, result, model) == pytest.approx(8.0, abs=1e-12)


def test_normalised_lps_scales_each_constraint_and_keeps_its_form():
    """Bounds scale with their row's costs; a missing bound stays missing; same selection."""
    kwargs = dict(
        name="x",
        constraints={"w": (None, 40.0), "v": 15.0},
        constraints_to_candidate_costs={"w": [[10, 20], [20, 40]], "v": [[5, 10], [5, 10]]},
        candidate_scores=[[1.0, 0.0], [2.0, 0.0]],
    )
    lps = autoquant.NormalisedLPS(**kwargs)
    assert lps.constraints == {"w": (None, 40 / 60), "v": 15 / 20}
    assert lps.constraints_to_candidate_costs["w"] == [[10 / 60, 20 / 60], [20 / 60, 40 / 60]]
    # Keeping the second layer BF16 would score lower but costs 50 > 40: the first stays BF16.
    assert lps() == LPS(**kwargs)() == ([1, 0], "Optimal")


def test_modelopt_lp_is_restored_after_a_failed_search():
    with pytest.raises(RuntimeError), autoquant.normalised_lp():
        assert alg.LPS is autoquant.NormalisedLPS
        raise RuntimeError("search failed")
    assert alg.LPS is LPS
