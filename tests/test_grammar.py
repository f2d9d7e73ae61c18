"""The grounding grammar on its own: known answers for what it allows, and that nothing it allows is dropped by the
parser (a seeded walk through random allowed choices, on the shapes tokenizer and the tiny test tokenizer)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from paligemma_edge import PaliGemma
from paligemma_edge.runtime import spec
from paligemma_edge.runtime.errors import GenerationError, PromptError
from paligemma_edge.runtime.export_format import TokenIds
from paligemma_edge.runtime.grammar import GroundingGrammar, grounding_labels, spell
from paligemma_edge.runtime.outputs import parse_output

from .helpers import (
    CONSTRAINED_BUDGET,
    CONSTRAINED_PROMPTS,
    SCRIPT,
    assert_constrained_as_referenced,
    hf_generate,
    load_hf,
)

SHAPES = Path(__file__).resolve().parent.parent / "shapes" / "trained" / "shapes-pg2" / "tokenizer.json"


def token_ids(tokenizer: Tokenizer) -> TokenIds:
    def of(token: str) -> int:
        value = tokenizer.token_to_id(token)
        assert value is not None
        return value

    return TokenIds(
        image=of(spec.IMAGE_TOKEN),
        bos=of(spec.BOS_TOKEN),
        eos=(of(spec.EOS_TOKEN),),
        pad=of(spec.PAD_TOKEN),
        loc0=of(spec.loc_token(0)),
        seg0=of(spec.seg_token(0)),
    )


@pytest.fixture(scope="module")
def shapes_tokenizer() -> Tokenizer:
    return Tokenizer.from_file(str(SHAPES))


def test_labels_of_a_prompt():
    assert grounding_labels("detect red circle ; triangle ; red circle") == ("detect", ("red circle", "triangle"))
    assert grounding_labels("  segment car ") == ("segment", ("car",))
    for prompt in ("caption en", "detect ;", "answer en what?"):
        with pytest.raises(PromptError):
            grounding_labels(prompt)


def test_spelling_reads_the_tokenizer(shapes_tokenizer):
    spelling = spell(shapes_tokenizer, "detect red circle ; triangle")
    word = shapes_tokenizer.token_to_id
    assert spelling.labels == ((word("▁red"), word("▁circle")), (word("▁triangle"),))
    assert spelling.separator == (word("▁;"), word("▁"))


def test_known_answers_of_a_detect_grammar(shapes_tokenizer):
    tokens = token_ids(shapes_tokenizer)
    grammar = GroundingGrammar(spell(shapes_tokenizer, "detect red circle ; red square"), tokens)
    loc, eos = tokens.loc0, tokens.eos[0]
    first = grammar.allowed(100)
    assert eos in first and loc + 1022 in first and loc + 1023 not in first  # nothing found, or a y_min
    for bin_ in (500, 200, 501):
        grammar.advance(loc + bin_)
    assert list(grammar.allowed(100)) == list(range(loc + 201, loc + 1024))  # x_max past x_min
    grammar.advance(loc + 300)
    red = shapes_tokenizer.token_to_id("▁red")
    assert list(grammar.allowed(100)) == [red]  # both labels start with "▁red"
    assert grammar.choosing_label and grammar.forced(100) == []  # the model shows here whether it writes one
    grammar.advance(red)
    circle, square = shapes_tokenizer.token_to_id("▁circle"), shapes_tokenizer.token_to_id("▁square")
    assert sorted(grammar.allowed(100)) == sorted([circle, square])
    grammar.advance(circle)
    separator = shapes_tokenizer.token_to_id("▁;")
    assert sorted(grammar.allowed(100)) == sorted([eos, separator])
    assert list(grammar.allowed(3)) == [eos]  # no room for another whole object
    grammar.advance(separator)
    assert grammar.forced(100) == [shapes_tokenizer.token_to_id("▁")]  # the rest of the separator
    grammar.advance(shapes_tokenizer.token_to_id("▁"))
    assert grammar.open_separator and eos in grammar.allowed(100)  # ending here takes the separator back
    for bin_ in (500, 200, 501, 300):  # the same box again ...
        grammar.advance(loc + bin_)
    grammar.advance(red)
    assert list(grammar.allowed(100)) == [square]  # ... can only be the other label
    assert grammar.copy().forced(100) == [square]


def test_an_object_that_leaves_the_grammar_is_skipped_to_the_next_separator(shapes_tokenizer):
    tokens = token_ids(shapes_tokenizer)
    grammar = GroundingGrammar(spell(shapes_tokenizer, "detect circle"), tokens)
    word = shapes_tokenizer.token_to_id
    loc = tokens.loc0
    for bin_ in (10, 20, 30, 40):
        assert grammar.advance(loc + bin_)
    assert grammar.choosing_label
    assert grammar.escape() == 4  # the four bins leave the output
    assert grammar.free and grammar.allowed(100) is None and grammar.forced(100) == []
    assert not grammar.advance(word("▁square")) and grammar.free  # written, kept out of the output
    assert not grammar.advance(word("▁;")) and not grammar.advance(word("▁"))
    assert not grammar.free and grammar.objects == 0  # the next object is the grammar's again
    assert grammar.in_box and tokens.eos[0] in grammar.allowed(100)
    grammar.escape()
    assert not grammar.advance(tokens.eos[0]) and grammar.done  # eos while skipping ends the output


def test_a_box_whose_every_label_was_written_cannot_be_written_again(shapes_tokenizer):
    tokens = token_ids(shapes_tokenizer)
    grammar = GroundingGrammar(spell(shapes_tokenizer, "detect triangle"), tokens)
    loc = tokens.loc0
    walk = [loc + 10, loc + 20, loc + 30, loc + 40, shapes_tokenizer.token_to_id("▁triangle")]
    walk += list(grammar.spelling.separator)
    for token in walk:
        grammar.advance(token)
    for token in walk[:3]:
        grammar.advance(token)
    assert loc + 40 not in grammar.allowed(100) and loc + 41 in grammar.allowed(100)


def test_a_budget_that_cannot_hold_an_object_allows_only_nothing_found(shapes_tokenizer):
    tokens = token_ids(shapes_tokenizer)
    grammar = GroundingGrammar(spell(shapes_tokenizer, "segment red circle"), tokens)
    assert grammar.shortest_object == 4 + 16 + 2
    assert list(grammar.allowed(21)) == [tokens.eos[0]] and len(grammar.allowed(22)) == 1023 + 1


@pytest.mark.parametrize("prompt", ["detect red circle ; triangle", "segment blue square ; circle", "detect square"])
def test_every_walk_the_grammar_allows_parses_whole(shapes_tokenizer, tokenizer_of_tests, prompt):
    """Random allowed choices (seeded) under random budgets: the parser keeps every object, drops nothing, and
    each object is labelled with an expression the prompt asked for."""
    for tokenizer in (shapes_tokenizer, tokenizer_of_tests):
        tokens = token_ids(tokenizer)
        _, names = grounding_labels(prompt)
        rng = np.random.default_rng(0)
        for _ in range(60):
            grammar = GroundingGrammar(spell(tokenizer, prompt), tokens)
            budget, written = int(rng.integers(1, 160)), []
            while len(written) < budget:
                allowed = grammar.allowed(budget - len(written))
                token = int(rng.choice(allowed))
                grammar.advance(token)
                if token == tokens.eos[0]:
                    break
                written.append(token)
            text = tokenizer.decode(written, skip_special_tokens=True)
            parsed = parse_output(text, 640, 480)
            assert parsed.dropped == [] and parsed.text == "", (text, parsed.dropped)
            assert all(obj.label in names for obj in parsed.objects)
            if "segment" in prompt:
                assert all(obj.seg_codes is not None for obj in parsed.objects)


@pytest.fixture(scope="module")
def tokenizer_of_tests(exports) -> Tokenizer:
    return Tokenizer.from_file(str(exports["pg1"].export_dir / "tokenizer.json"))


# ---------------------------------------------------------------------------------------------- decoding under it
def test_constrained_greedy_equals_transformers_under_the_grammar(exports, images, constrained_references):
    """Every token generated (kept or skipped) and the output equal the one-token-at-a-time reference: single,
    batched, and beside an unconstrained batch-mate (whose tokens equal transformers' own)."""
    left = 0
    for name in ("pg1", "pg2"):
        runtime = PaliGemma.load(exports[name].export_dir)
        left += assert_constrained_as_referenced(runtime, name, images, constrained_references)
        model, processor = load_hf(exports[name].checkpoint)
        batch = runtime.new_batch()
        free = runtime.new_sequence(images[0], "caption en", max_new_tokens=CONSTRAINED_BUDGET)
        bound = runtime.new_sequence(
            images[1], CONSTRAINED_PROMPTS[0], max_new_tokens=CONSTRAINED_BUDGET, constrained=True
        )
        batch.join([free, bound])
        while len(batch):
            batch.step()
        assert free.token_ids == hf_generate(model, processor, [images[0]], ["caption en"], CONSTRAINED_BUDGET)[0]
        assert bound.token_ids == constrained_references[name, 1, CONSTRAINED_PROMPTS[0]][1]
    assert left, "a random model leaves the grammar somewhere: the skipping is exercised"


def test_scripted_answers_under_the_grammar(scripted_export, images):
    """The scripted model always writes SCRIPT (a `segment car` answer): asked for, it is kept token for token with
    the final eos fed with the label's step; not asked for, or with no room for it, nothing is found."""
    runtime = PaliGemma.load(scripted_export)
    for prompt in ("segment car", "segment car ; dog", "segment dog ; car"):
        got = runtime.generate(images[0], prompt, 40, constrained=True)
        assert got.text == SCRIPT and got.finish_reason == "eos", prompt
    tight = runtime.generate(images[0], "segment car", 22, constrained=True)  # 4 + 16 + 1 tokens, then no room
    assert tight.text == SCRIPT and tight.timings.forced_tokens == 1  # the eos: the only token the budget allows
    for prompt, budget in (("segment dog", 40), ("segment car", 20)):
        got = runtime.generate(images[0], prompt, budget, constrained=True)
        assert got.text == "" and got.token_ids == [], (prompt, budget)
    objects = runtime.segment(images[0], ["dog"])
    assert objects.objects == [] and objects.dropped == []
    (car,) = runtime.segment(images[0], ["car"]).objects
    assert car.label == "car" and car.mask is not None


def test_streams_show_only_what_the_grammar_cannot_take_back(scripted_export, exports, images):
    runtime = PaliGemma.load(exports["pg2"].export_dir)
    for prompt in CONSTRAINED_PROMPTS:
        for index in range(2):
            pieces = list(runtime.stream(images[index], prompt, CONSTRAINED_BUDGET, constrained=True))
            assert "".join(pieces) == runtime.generate(images[index], prompt, CONSTRAINED_BUDGET, constrained=True).text
    scripted = PaliGemma.load(scripted_export)
    assert "".join(scripted.stream(images[0], "segment car", 40, constrained=True)) == SCRIPT


def test_constrained_needs_a_grounding_prompt_and_no_eos_games(exports, images):
    runtime = PaliGemma.load(exports["pg1"].export_dir)
    with pytest.raises(PromptError, match="detect / segment"):
        runtime.generate(images[0], "caption en", 8, constrained=True)
    with pytest.raises(GenerationError, match="ignore_eos"):
        runtime.generate(images[0], "detect car", 8, constrained=True, ignore_eos=True)
    with pytest.raises(GenerationError, match="constrained"):
        runtime.generate(images[0], "detect car", 8, constrained="yes")
