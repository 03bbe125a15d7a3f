"""The bundled dataset: a character-level corpus this package generates itself, deterministically.

Nothing is downloaded or read from disk. Sentences are drawn from templates and small word lists by a
seeded generator, so the corpus has real structure (words, grammar, punctuation, agreement of "a" /
"an" and plurals) that a tiny GPT picks up within a few hundred steps, and it is byte-identical on every
machine and every run for a given size.

Batches are drawn by a :class:`BatchSampler` with its own ``torch.Generator``; its state is saved in
every checkpoint so that a resumed run draws exactly the batches an uninterrupted run would have.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from ml_playground.errors import CheckpointSchemaError, ConfigError

__all__ = [
    "BatchSampler",
    "CORPUS_SEED",
    "CharTokenizer",
    "Splits",
    "fixed_batches",
    "generate_corpus",
    "load_splits",
    "splits_for_checkpoint",
    "tokenizer_for_checkpoint",
]

CORPUS_SEED = 20240601
"""The corpus is a fixed property of the package, not of an experiment's seed."""

_NAMES = ("Ada", "Ben", "Cleo", "Dan", "Eva", "Finn", "Gus", "Hana", "Ivo", "Jun", "Kai", "Lena", "Mia", "Omar")
_PLACES = ("market", "river", "garden", "station", "library", "harbor", "forest", "kitchen", "bakery", "hill")
_NOUNS = ("apple", "boat", "cat", "dog", "lamp", "letter", "map", "owl", "pear", "song", "stone", "kite", "egg")
_ADJECTIVES = ("old", "red", "small", "quiet", "bright", "green", "heavy", "odd", "warm", "empty", "blue", "tiny")
_VERBS = ("found", "carried", "painted", "lost", "opened", "cleaned", "dropped", "hid", "sold", "watched")
_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_NUMBERS = ("two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
_FEELINGS = ("happy", "tired", "hungry", "curious", "late", "glad", "sleepy")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _sentence(rng: random.Random) -> str:
    name, other = rng.sample(_NAMES, 2)
    noun, adj, place = rng.choice(_NOUNS), rng.choice(_ADJECTIVES), rng.choice(_PLACES)
    kind = rng.randrange(7)
    if kind == 0:
        return f"{name} {rng.choice(_VERBS)} {_article(adj)} {adj} {noun} at the {place}."
    if kind == 1:
        return f"On {rng.choice(_DAYS)}, {name} and {other} went to the {place}."
    if kind == 2:
        return f"{name} has {rng.choice(_NUMBERS)} {noun}s and {other} has one {noun}."
    if kind == 3:
        return f'"Where is the {noun}?" asked {name}. "By the {place}," said {other}.'
    if kind == 4:
        return f"The {noun} was {adj}, so {name} felt {rng.choice(_FEELINGS)}."
    if kind == 5:
        return f"{name} gave {other} {_article(noun)} {noun}."
    return f"At the {place} there is {_article(adj)} {adj} {noun}."


def generate_corpus(n_chars: int, seed: int = CORPUS_SEED) -> str:
    """At least ``n_chars`` characters of paragraphs, cut at exactly ``n_chars``; same text for same inputs."""
    rng = random.Random(seed)
    parts: list[str] = []
    total = 0
    while total < n_chars:
        paragraph = " ".join(_sentence(rng) for _ in range(rng.randint(2, 5))) + "\n\n"
        parts.append(paragraph)
        total += len(paragraph)
    return "".join(parts)[:n_chars]


class CharTokenizer:
    """One token per character of a fixed vocabulary (stored in checkpoints as a plain string)."""

    def __init__(self, vocab: str) -> None:
        if not vocab or len(set(vocab)) != len(vocab):
            raise ValueError("a vocabulary is a non-empty string of distinct characters")
        self.vocab = vocab
        self._index = {ch: i for i, ch in enumerate(vocab)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls("".join(sorted(set(text))))

    @property
    def size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        unknown = sorted({ch for ch in text if ch not in self._index})
        if unknown:
            raise ConfigError(
                f"text contains characters outside the model's vocabulary: {''.join(unknown)!r}; "
                f"use only these characters: {self.vocab!r}"
            )
        return [self._index[ch] for ch in text]

    def decode(self, tokens: Iterable[int]) -> str:
        return "".join(self.vocab[t] for t in tokens)


@dataclass(frozen=True)
class Splits:
    """The encoded corpus split into training and validation tokens."""

    tokenizer: CharTokenizer
    train: torch.Tensor
    val: torch.Tensor
    corpus_chars: int
    val_fraction: float

    def describe(self) -> dict[str, str | int | float]:
        """Plain data for ``Checkpoint.data_state``: enough to rebuild this dataset and its vocabulary."""
        return {
            "dataset": "bundled_chars",
            "corpus_chars": self.corpus_chars,
            "val_fraction": self.val_fraction,
            "vocab": self.tokenizer.vocab,
        }


def load_splits(corpus_chars: int, val_fraction: float, block_size: int) -> Splits:
    """Generate, encode and split the bundled corpus; each split must hold more than one block."""
    text = generate_corpus(corpus_chars)
    tokenizer = CharTokenizer.from_text(text)
    tokens = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    n_val = int(len(tokens) * val_fraction)
    train, val = tokens[: len(tokens) - n_val], tokens[len(tokens) - n_val :]
    for split, data in (("train", train), ("validation", val)):
        if len(data) <= block_size + 1:
            raise ConfigError(
                f"the {split} split has {len(data)} characters, too few for train.model.block_size={block_size}; "
                "raise train.data.corpus_chars or train.data.val_fraction, or lower block_size"
            )
    return Splits(tokenizer, train, val, corpus_chars, val_fraction)


def splits_for_checkpoint(data_state: Mapping[str, object], block_size: int, *, source: str) -> Splits:
    """The dataset a checkpoint was trained on, rebuilt from its ``data_state`` (not from any TOML)."""
    corpus_chars, val_fraction = data_state.get("corpus_chars"), data_state.get("val_fraction")
    if data_state.get("dataset") != "bundled_chars" or not isinstance(corpus_chars, int):
        raise CheckpointSchemaError(f"{source}: data_state does not describe the bundled dataset")
    if not isinstance(val_fraction, float):
        raise CheckpointSchemaError(f"{source}: data_state.val_fraction must be a float, got {val_fraction!r}")
    splits = load_splits(corpus_chars, val_fraction, block_size)
    if splits.tokenizer.vocab != data_state.get("vocab"):
        raise CheckpointSchemaError(f"{source}: its vocabulary differs from the bundled dataset's")
    return splits


def tokenizer_for_checkpoint(data_state: Mapping[str, object], *, source: str) -> CharTokenizer:
    vocab = data_state.get("vocab")
    if not isinstance(vocab, str) or not vocab:
        raise CheckpointSchemaError(f"{source}: data_state.vocab is missing; it was not written by the trainer")
    try:
        return CharTokenizer(vocab)
    except ValueError as exc:
        raise CheckpointSchemaError(f"{source}: data_state.vocab is invalid: {exc}") from None


class BatchSampler:
    """Random (input, target) windows of one split, drawn by a generator whose state can be saved."""

    def __init__(self, data: torch.Tensor, block_size: int, batch_size: int, seed: int) -> None:
        self.data = data
        self.block_size = block_size
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.batches_drawn = 0

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(len(self.data) - self.block_size, (self.batch_size,), generator=self.generator)
        offsets = torch.arange(self.block_size)
        x = self.data[starts[:, None] + offsets]
        y = self.data[starts[:, None] + offsets + 1]
        self.batches_drawn += 1
        return x, y

    def state(self) -> torch.Tensor:
        return self.generator.get_state()

    def restore(self, state: torch.Tensor, batches_drawn: int) -> None:
        self.generator.set_state(state)
        self.batches_drawn = batches_drawn


def fixed_batches(
    data: torch.Tensor, block_size: int, batch_size: int, count: int, seed: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same ``count`` batches every time: evaluations compare like with like across iterations."""
    sampler = BatchSampler(data, block_size, batch_size, seed)
    return [sampler.next() for _ in range(count)]
