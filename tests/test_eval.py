"""diffv2.eval: generators are deterministic and put things where they say; each scorer gives an oracle 1.0 (or
zero loss) and a uniform model chance; the shared-prompt forward equals whole rows."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import torch

from diffv2 import ModelConfig, Transformer
from diffv2.data import Tokenizer
from diffv2.errors import ConfigError
from diffv2.eval import TASKS, EvalContext, ar_hit, distractor, icl, needle, passkey, resolve_tasks
from diffv2.eval.retrieval import N_CANDIDATES, Numbers, score_sample
from diffv2.eval.text import TextSource, insert_at_depths, sentence_starts

from .eval_stubs import Lookahead, SequenceOracle, Uniform

TOK = Tokenizer.byte_level()
V = TOK.vocab_size


def random_text(seed: int, n_docs: int = 6, sentences: int = 60) -> TextSource:
    """Documents of random lowercase sentences (fresh every seed), as byte tokens."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n_docs):
        words = [
            "".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), rng.integers(2, 7))) for _ in range(4 * sentences)
        ]
        text = " ".join(" ".join(words[i : i + 4]).capitalize() + "." for i in range(0, len(words), 4))
        docs.append(np.array(TOK.encode(text), dtype=np.int64))
    return TextSource(docs, "random test text", TOK.encode("\n\n"))


def context(model, seed: int = 0, train_len: int = 256, **options) -> EvalContext:
    return EvalContext(
        model, TOK, train_len, V, seed=seed, text_source=random_text(seed), options=options, progress=False
    )


def needle_samples(seed: int, cells):
    ctx = context(None, seed)
    numbers = Numbers(TOK, needle.DIGITS, ctx.rng("needle/numbers"))
    rng = ctx.rng("needle")
    return [
        needle.make_sample(ctx, numbers, c["length"], c["n_needles"], c["n_queried"], c["depth"], rng)
        for c in cells
        for _ in range(c["n"])
    ]


CELLS = [
    {"length": 400, "n_needles": n, "n_queried": r, "depth": d, "n": 2}
    for n, r in ((1, 1), (2, 2), (4, 1))
    for d in (0.0, 0.5, 1.0)
]


def test_needle_generator_is_deterministic_and_places_needles() -> None:
    a, b = needle_samples(3, CELLS), needle_samples(3, CELLS)
    assert [s.prompt for s in a] == [s.prompt for s in b]
    assert [s.prompt for s in needle_samples(4, CELLS)] != [s.prompt for s in a]
    for cell, sample in zip([c for c in CELLS for _ in range(c["n"])], a, strict=True):
        assert len(sample.prompt) == cell["length"]
        slot = sample.slots[0]
        needle_numbers = [slot.candidates[i] for i in slot.needles]
        assert len(needle_numbers) == cell["n_needles"] and len(slot.candidates) == N_CANDIDATES
        for (start, end), number in zip(sample.meta["needle_spans"], needle_numbers, strict=True):
            assert sample.prompt[start:end] == number  # the number sits where the span says...
            assert TOK.decode(sample.prompt[start - 25 : start]).endswith("is")  # ...after its sentence
        # the queried needle is the first one, at the cell's depth up to the spacing of sentence starts (≤ 50 bytes)
        right = slot.candidates[slot.correct]
        assert sample.prompt[slice(*sample.meta["needle_spans"][0])] == right
        assert abs(sample.meta["actual_depth"] - cell["depth"]) <= 50 / 400
        assert TOK.decode(sample.prompt[-40:]).endswith("is")  # the prompt stops where the answer goes


def test_insert_at_depths_uses_sentence_starts() -> None:
    hay = random_text(1).stream[:300]
    inserts = [np.array(TOK.encode(" X1.")), np.array(TOK.encode(" Y2."))]
    out, at, where = insert_at_depths(hay, inserts, [0.7, 0.2], TOK)
    assert len(out) == 300 + sum(map(len, inserts))
    starts = set(sentence_starts(hay, TOK).tolist())
    assert where[1] < where[0] and set(where) <= starts and at == [where[0] + len(inserts[1]), where[1]]
    assert all(abs(w - d * 300) <= 50 for w, d in zip(where, [0.7, 0.2], strict=True))
    for i, ins in enumerate(inserts):
        assert out[at[i] : at[i] + len(ins)].tolist() == ins.tolist()


@pytest.mark.parametrize("task", ["needle", "passkey"])
def test_retrieval_scorers_oracle_and_uniform(task: str, tmp_path) -> None:
    cells = CELLS if task == "needle" else [{"length": 500, "depth": d, "n": 2} for d in (0.0, 0.5, 1.0)]
    module = needle if task == "needle" else passkey
    ctx = context(None, seed=1)
    if task == "needle":
        samples = needle_samples(1, cells)
    else:
        numbers = Numbers(TOK, passkey.DIGITS, ctx.rng("passkey/numbers"))
        samples = [passkey.make_sample(ctx, numbers, c["length"], c["depth"]) for c in cells for _ in range(c["n"])]
    ctx.model = SequenceOracle([s.full() for s in samples], V)
    oracle = [score_sample(ctx, s) for s in samples]
    assert all(r["em"] == 1.0 and r["ll"] == 1.0 for r in oracle)
    assert all(r["ll_needles"] in (None, 1.0) for r in oracle)
    ctx.model = Uniform(V)
    uniform = [score_sample(ctx, s) for s in samples]
    assert all(r["em"] == 0.0 and r["ll"] == pytest.approx(1 / N_CANDIDATES) for r in uniform)
    for r, s in zip(uniform, samples, strict=True):
        n = len(s.slots[0].needles)
        assert r["ll_needles"] == (None if n == 1 else pytest.approx(1 / n))
    # the whole task (generator + scorer + result) on the oracle of its own samples
    ctx.model = SequenceOracle([s.full() for s in samples], V)
    result = module.run(context(ctx.model, seed=1), cells_override=cells)
    assert result["by_depth_length"] and all(r["em"] == 1.0 for r in result["by_depth_length"])
    assert result["numbers"]["tokens_per_number"] == 6 and result["numbers"]["single_digit_tokens"]  # " " + 5 digits
    if importlib.util.find_spec("matplotlib"):
        (figure,) = module.plot(result, tmp_path)
        assert figure == tmp_path / f"{task}.png" and figure.stat().st_size > 1000


def test_icl_oracle_uniform_and_orders() -> None:
    rng = np.random.default_rng(5)
    task = icl.make_task(TOK, 3, 300, 6, rng)
    counts = np.bincount([c for _, c in task["demos"]], minlength=3)
    assert counts.min() == counts.max() > 0  # balanced
    alternating = icl.order(task["demos"], 3, True, np.random.default_rng(0))
    classes = [task["demos"][i][1] for i in alternating]
    assert classes == [0, 1, 2] * (len(classes) // 3) and sorted(alternating) == list(range(len(task["demos"])))
    prompt, conts = icl.prompts(task, 3, False, np.random.default_rng(1), TOK.eot_id)
    assert len(prompt) <= 300 and all(
        c[-1] == task["labels"][q] for c, (_, q) in zip(conts, task["queries"], strict=True)
    )
    classes = [c for _, c in task["queries"]]
    ctx = context(SequenceOracle([prompt + c for c in conts], V))
    assert icl.accuracy(ctx, prompt, conts, task["labels"], classes) == 1.0
    ctx.model = Uniform(V)
    assert icl.accuracy(ctx, prompt, conts, task["labels"], classes) == pytest.approx(1 / 3)


def test_ar_hit_distances_and_scorer() -> None:
    tokens = np.array([5, 6, 7, 5, 6, 9, 7, 5, 6])
    #                        bigram (5,6) ends at 1, 4, 8; (7,5) at 3, 7
    assert ar_hit.hit_distances(tokens).tolist() == [0, 0, 0, 0, 3, 0, 0, 4, 4]
    for model, expected in ((Lookahead(V), 0.0), (Uniform(V), math.log(V))):
        result = ar_hit.run(context(model, train_len=128, ar_hit_windows=3))
        assert result["hit"]["n"] > 0 and result["other"]["n"] > 0
        assert result["hit"]["n"] + result["other"]["n"] == 3 * 127
        assert result["hit"]["loss"] == pytest.approx(expected, abs=1e-6)
        assert result["other"]["loss"] == pytest.approx(expected, abs=1e-6)


def test_distractor_conditions_and_scorer() -> None:
    text = random_text(2)
    target, ks = distractor.lengths(128)
    samples, source = distractor.make_samples(text.documents, target, ks, 4, np.random.default_rng(0))
    assert source == "another document" and len(samples) == 4
    one, source = distractor.make_samples(text.documents[:1], target, ks, 8, np.random.default_rng(0))
    assert source == "a distant part of the same document" and len(one) == 8
    for _, tgt, unrelated in one:  # at least two sample lengths (96 + 32) from the sample
        doc = text.documents[0].tolist()
        sample_at = next(i for i in range(len(doc)) if doc[i : i + len(tgt)] == tgt.tolist())
        unrelated_at = next(i for i in range(len(doc)) if doc[i : i + 96] == unrelated.tolist())
        assert abs(unrelated_at - (sample_at - 96)) >= 2 * (96 + 32)
    true_prefix, tgt, unrelated = samples[0]
    conds = distractor.conditions(true_prefix, unrelated, ks)
    assert len(conds["none"]) == 0 and conds["true_64"].tolist() == true_prefix[-64:].tolist()
    assert max(len(p) for p in conds.values()) + len(tgt) <= 128
    for model, expected in ((Lookahead(V), 0.0), (Uniform(V), math.log(V))):
        result = distractor.run(context(model, train_len=128, distractor_samples=3))
        assert set(result["loss"]) == set(conds) and all(
            v == pytest.approx(expected, abs=1e-6) for v in result["loss"].values()
        )


@pytest.mark.parametrize("attention", ["baseline", "diff_v1", "diff_v2"])
def test_shared_prompt_forward_equals_whole_rows(attention: str) -> None:
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny", attention=attention, vocab_size=V, max_seq_len=64)).eval()
    prompt = torch.randint(0, V, (70,)).tolist()  # past max_seq_len: positions are passed explicitly
    conts = [torch.randint(0, V, (n,)).tolist() for n in (3, 5, 1)]
    shared = context(model).continuation_logits(prompt, conts)
    whole = context(lambda t, positions: model(t, positions=positions)).continuation_logits(prompt, conts)
    for i, c in enumerate(conts):
        torch.testing.assert_close(shared[i, : len(c)], whole[i, : len(c)], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("attention", ["baseline", "diff_v2"])
def test_prompts_of_one_length_scored_as_a_batch_equal_each_alone(attention: str) -> None:
    """A cell's samples run together (prompts in one batch, every continuation against its own prompt's keys and
    values, split over several calls here): the logits each prompt gets alone."""
    torch.manual_seed(1)
    model = Transformer(ModelConfig.preset("tiny", attention=attention, vocab_size=V, max_seq_len=64)).eval()
    prompts = [torch.randint(0, V, (40,)).tolist() for _ in range(3)]
    conts = [[torch.randint(0, V, (n,)).tolist() for n in sizes] for sizes in ((3, 5), (2,), (4, 1, 6))]
    ctx = context(model)
    ctx.max_tokens = 2 * (40 + 17)  # two prompts per call, two continuation rows per call
    together = ctx.continuation_logits_many(prompts, conts)
    for prompt, cs, got in zip(prompts, conts, together, strict=True):
        alone = context(model).continuation_logits(prompt, cs)
        assert got.shape == alone.shape
        for i, c in enumerate(cs):
            torch.testing.assert_close(got[i, : len(c)], alone[i, : len(c)], atol=1e-5, rtol=1e-5)


def test_registry_resolves_and_refuses() -> None:
    assert [t.name for t in resolve_tasks("needle, passkey,needle")] == ["needle", "passkey"]
    assert resolve_tasks("lm_eval:hellaswag")[0].name == "lm_eval:hellaswag"
    assert {"needle", "passkey", "ar_hit", "distractor", "icl", "mqar"} <= set(TASKS)
    with pytest.raises(ConfigError, match="unknown task 'nedle'"):
        resolve_tasks("nedle")
