"""A token grammar for grounding outputs (`detect`, `segment`): which tokens may come next, one token at a time.

    output    = eos | object (separator object)* eos
    object    = <loc y_min> <loc x_min> <loc y_max> <loc x_max> [<seg> × 16] label
    label     = one of the expressions the prompt asked for, spelled as the tokenizer spells " expression"
                after a <loc> or <seg> token (a label of several tokens is a path in a trie of them)
    separator = the tokenizer's spelling of " ; " between a label and the next <loc> (docs/io-contract.md §8)

"Nothing found" is eos first, what PaliGemma is trained to write for an absent object; eos right after a separator
ends the output there, the separator taken back. The model's own preference decides whether it is writing an object
of the prompt's at all: while it writes a box, it may prefer to end, separate or label (eos, the separator's or a
label's tokens) over every allowed bin or code; once the box is written, its best token over the whole vocabulary
may start no asked label. Then the object leaves the output, as the parser would drop it: what the model writes is
fed on unconstrained, kept out of the output, until its next separator (the grammar takes over again) or eos. So
an output the grammar accepts is decoded token for token as without it, and what the grammar keeps is what the
parser would keep, each object whole and asked for. Whatever the output parser
(outputs.py) would drop cannot be written: a box whose y_max / x_max is not past its y_min / x_min, an object that
repeats an earlier one (the same four bins and label), an object the token budget cannot hold whole (then only eos
is allowed). Where the grammar leaves one token only (the rest of a label its first token decided, the rest of the
separator), `forced` lists them, for the loop to feed in one decoder call.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
from tokenizers import Tokenizer

from . import spec, tasks
from .errors import PromptError
from .export_format import TokenIds

LOC_BINS = spec.NUM_LOC_TOKENS
_PROBE = spec.loc_token(0) * spec.LOC_TOKENS_PER_BOX  # what a label follows


@dataclass(frozen=True)
class Spelling:
    """How a tokenizer writes a grounding answer to one prompt: each label's tokens and the separator's."""

    task: str  # "detect" or "segment"
    names: tuple[str, ...]
    labels: tuple[tuple[int, ...], ...]
    separator: tuple[int, ...]


def grounding_labels(prompt: str) -> tuple[str, tuple[str, ...]]:
    """(task, the expressions asked for) of a `detect` / `segment` prompt; PromptError for any other."""
    task = tasks.task_of(prompt)
    if task is None or not task.localizes:
        raise PromptError(
            f"grammar-constrained decoding applies to detect / segment prompts, not {prompt!r}; pass constrained=False "
            "(or --no-grammar)."
        )
    body = tasks.clean_prompt(prompt)[len(task.prefix) :]
    names = tuple(dict.fromkeys(name.strip() for name in body.split(";") if name.strip()))
    if not names:
        raise PromptError(f"{prompt!r} names nothing to find; e.g. '{task.prefix} cat ; dog'.")
    return task.prefix, names


def spell(tokenizer: Tokenizer, prompt: str) -> Spelling:
    """The label and separator tokens of ``prompt``'s answers, as the tokenizer writes whole answers."""
    task, names = grounding_labels(prompt)
    encode = functools.partial(_encode, tokenizer)
    probe = encode(_PROBE)
    labels = []
    for name in names:
        ids = encode(f"{_PROBE} {name}")
        if ids[: len(probe)] != probe or len(ids) == len(probe):
            raise PromptError(f"this tokenizer does not spell the label {name!r} after a <loc> token on its own.")
        labels.append(tuple(ids[len(probe) :]))
    separator: tuple[int, ...] | None = None
    for name, label in zip(names, labels):
        ids = encode(f"{_PROBE} {name} ; {_PROBE}")
        head = probe + list(label)
        if ids[: len(head)] != head or ids[-len(probe) :] != probe:
            raise PromptError(
                f"this tokenizer merges the label {name!r} with the ' ; ' after it; it cannot be constrained."
            )
        between = tuple(ids[len(head) : -len(probe)])
        if separator not in (None, between) or not between:
            raise PromptError("this tokenizer spells the ' ; ' between objects differently after different labels.")
        separator = between
    assert separator is not None
    return Spelling(task, names, tuple(labels), separator)


def _encode(tokenizer: Tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False).ids


@dataclass
class _Node:
    """A trie node of label tokens: its children and the labels that end here."""

    children: dict[int, _Node] = field(default_factory=dict)
    ends: list[int] = field(default_factory=list)  # label indices
    labels: set[int] = field(default_factory=set)  # label indices through this node
    shortest: int = 0  # tokens from here to the end of the shortest label through it


def _trie(labels: tuple[tuple[int, ...], ...]) -> _Node:
    root = _Node()
    for index, tokens in enumerate(labels):
        node = root
        node.labels.add(index)
        for token in tokens:
            node = node.children.setdefault(token, _Node())
            node.labels.add(index)
        node.ends.append(index)

    def measure(node: _Node) -> int:
        lengths = [0] * bool(node.ends) + [1 + measure(child) for child in node.children.values()]
        node.shortest = min(lengths)
        return node.shortest

    measure(root)
    return root


class GroundingGrammar:
    """One sequence's position in the grammar: ``allowed`` ids next (given the tokens the budget leaves), ``advance``
    by a token (which says whether it belongs to the output), ``forced`` tokens, and ``escape`` when the model leaves
    an object."""

    def __init__(self, spelling: Spelling, tokens: TokenIds):
        self.spelling = spelling
        self.segment = spelling.task == "segment"
        self.eos = tokens.eos[0]
        self.loc0, self.seg0 = tokens.loc0, tokens.seg0
        self.trie = _trie(spelling.labels)
        self.box_tokens = spec.LOC_TOKENS_PER_BOX + (spec.SEG_CODES_PER_OBJECT if self.segment else 0)
        self.shortest_object = self.box_tokens + self.trie.shortest
        self.written: set[tuple[tuple[int, ...], int]] = set()  # (bins, label) of every object so far
        self.objects = 0  # objects in the output
        self.locs: list[int] = []
        self.segs = 0
        self.node: _Node | None = None  # inside a label
        self.label_tokens = 0  # tokens of the label being written
        self.separated = 0  # separator tokens written of one in progress (0: none)
        self.open_separator = False  # the output ends with a separator: an object must follow, or it is taken back
        self.skipped: list[int] | None = None  # tokens of an object that left the grammar (see `escape`)
        self.done = False

    # ------------------------------------------------------------------ what may come next
    @property
    def free(self) -> bool:
        """Skipping an object that left the grammar: any token may come (None from `allowed`)."""
        return self.skipped is not None

    def allowed(self, remaining: int) -> np.ndarray | None:
        """Token ids allowed next, with ``remaining`` tokens left in the budget (this one included); None while free."""
        if self.free:
            return None
        if self.done:
            return np.array([self.eos], np.int64)
        if 0 < self.separated < len(self.spelling.separator):
            return np.array([self.spelling.separator[self.separated]], np.int64)
        if self.node is not None:
            return self._label_tokens(remaining)
        if len(self.locs) < spec.LOC_TOKENS_PER_BOX:
            return self._loc_tokens(remaining)
        return np.arange(self.seg0, self.seg0 + spec.NUM_SEG_TOKENS, dtype=np.int64)

    def _loc_tokens(self, remaining: int) -> np.ndarray:
        count = len(self.locs)
        if count == 0:
            if remaining < self.shortest_object:
                return np.array([self.eos], np.int64)  # no whole object fits: the output ends here
            return np.concatenate([self.loc0 + np.arange(LOC_BINS - 1), [self.eos]]).astype(np.int64)
        if count == 1:
            return self.loc0 + np.arange(LOC_BINS - 1)  # x_min leaves room for an x_max past it
        if count == 2:
            return self.loc0 + np.arange(self.locs[0] + 1, LOC_BINS)
        bins = [b for b in range(self.locs[1] + 1, LOC_BINS) if not self._every_label_written((*self.locs, b))]
        return self.loc0 + np.array(bins, np.int64)

    def _every_label_written(self, box: tuple[int, ...]) -> bool:
        return all((box, index) in self.written for index in range(len(self.spelling.labels)))

    def _fresh(self) -> set[int]:
        """The labels not yet written with this box."""
        box = tuple(self.locs)
        return {index for index in range(len(self.spelling.labels)) if (box, index) not in self.written}

    def _label_tokens(self, remaining: int) -> np.ndarray:
        assert self.node is not None
        fresh = self._fresh()
        allowed = [
            token
            for token, child in self.node.children.items()
            if child.labels & fresh and 1 + child.shortest <= remaining
        ]
        if set(self.node.ends) & fresh:  # a label is complete here: the object may end
            # (where the separator's first token also continues a longer label, it continues the label)
            allowed += [token for token in self._after_object(remaining) if token not in allowed]
        return np.array(sorted(allowed), np.int64)

    def _after_object(self, remaining: int) -> list[int]:
        """eos, and the separator where another whole object fits after it."""
        room_for_more = len(self.spelling.separator) + self.shortest_object <= remaining
        return [self.eos, self.spelling.separator[0]] if room_for_more else [self.eos]

    @property
    def in_box(self) -> bool:
        """Writing an object's bins or codes, or about to start one."""
        return not self.free and not self.done and self.node is None and self.separated == 0

    @property
    def unsettled(self) -> int:
        """Output tokens at its end that may still be taken back: the box of an object whose label has not begun,
        and the separator before it (or one no object has followed yet)."""
        if self.separated:
            return self.separated
        if self.node is not None and self.node is not self.trie:
            return 0
        return len(self.locs) + self.segs + (len(self.spelling.separator) if self.objects > 0 else 0)

    @functools.cached_property
    def escapes(self) -> np.ndarray:
        """Tokens that, preferred over a box's allowed bins or codes, show the model is not writing this box: ending,
        separating or labelling, and every `<loc>` and `<seg>` — a bin the box does not allow (y_max not past y_min,
        a duplicate) or a code where a bin belongs is an object the parser would drop, not one to bend into shape."""
        words = {token for label in self.spelling.labels for token in label} | set(self.spelling.separator)
        box = set(range(self.loc0, self.loc0 + spec.NUM_LOC_TOKENS)) | set(
            range(self.seg0, self.seg0 + spec.NUM_SEG_TOKENS)
        )
        return np.array(sorted(words | box | {self.eos}), np.int64)

    @property
    def choosing_label(self) -> bool:
        """The box is written and the label's first token comes next: where the model shows whether the object is
        one the prompt asked for (the loop then needs logits over the whole vocabulary)."""
        return self.node is self.trie and not self.free

    # ------------------------------------------------------------------ moving on
    def advance(self, token: int) -> bool:
        """Take ``token`` (one of `allowed`'s, or any while free); True if it belongs to the output."""
        if self.free:
            return self._skip(token)
        if token == self.eos:
            self.done = True
            return False
        if 0 < self.separated < len(self.spelling.separator):
            self.separated += 1
            if self.separated == len(self.spelling.separator):
                self.separated, self.open_separator = 0, True
            return True
        if self.node is not None:
            child = self.node.children.get(token)
            if child is None or not child.labels & self._fresh():  # the separator: the object ends
                self._finish_object()
                if len(self.spelling.separator) > 1:
                    self.separated = 1
                else:
                    self.open_separator = True
                return True
            self.node = child
            self.label_tokens += 1
            return True
        self.open_separator = False
        if len(self.locs) < spec.LOC_TOKENS_PER_BOX:
            self.locs.append(token - self.loc0)
        else:
            self.segs += 1
        if len(self.locs) == spec.LOC_TOKENS_PER_BOX and (not self.segment or self.segs == spec.SEG_CODES_PER_OBJECT):
            self.node, self.label_tokens = self.trie, 0
        return True

    def _finish_object(self) -> None:
        assert self.node is not None
        box = tuple(self.locs)
        (label,) = [index for index in self.node.ends if (box, index) not in self.written][:1]
        self.written.add((box, label))
        self.objects += 1
        self.locs, self.segs, self.node = [], 0, None

    def escape(self) -> int:
        """The model left the object it was writing: the object leaves the output (returns how many of its tokens
        to take back), and what the model writes next is skipped until its next separator or eos."""
        count = len(self.locs) + self.segs + self.label_tokens * (self.node is not None)
        self.locs, self.segs, self.node, self.label_tokens, self.skipped = [], 0, None, 0, []
        self.open_separator = self.objects > 0  # the separator before it waits for an object, or is taken back
        return count

    def _skip(self, token: int) -> bool:
        assert self.skipped is not None
        if token == self.eos:
            self.done = True
            return False
        self.skipped.append(token)
        separator = self.spelling.separator
        if tuple(self.skipped[-len(separator) :]) == separator:
            self.skipped = None  # the grammar takes over at the next object's box
        return False

    def forced(self, remaining: int) -> list[int]:
        """The tokens that must follow now (each the only one allowed), up to the budget; empty if there is a
        choice. A forced eos ends the output. A label's first token is never forced (see `choosing_label`)."""
        if self.done or self.free:
            return []
        probe = self.copy()
        run: list[int] = []
        while len(run) < remaining:
            allowed = probe.allowed(remaining - len(run))
            if allowed is None or len(allowed) != 1 or probe.choosing_label:
                break
            token = int(allowed[0])
            run.append(token)
            probe.advance(token)
            if token == self.eos:
                break
        return run

    def accepts(self, token_ids: list[int], budget: int) -> bool:
        """Whether a free decode's output (``token_ids``, up to eos, under ``budget`` tokens) is one this grammar
        allows token for token, ended where it may end (from a fresh grammar; this one is left as it was)."""
        probe = self.copy()
        for count, token in enumerate([*token_ids, self.eos]):
            if count == budget and token == self.eos:
                return True  # the budget ended it
            allowed = probe.allowed(budget - count)
            if allowed is None or token not in set(allowed.tolist()):
                return False
            probe.advance(token)
        return True

    def copy(self) -> GroundingGrammar:
        twin = object.__new__(GroundingGrammar)
        twin.__dict__.update(self.__dict__)
        twin.written, twin.locs = set(self.written), list(self.locs)
        twin.skipped = None if self.skipped is None else list(self.skipped)
        return twin
