"""What a network is conditioned on: class labels or text embeddings, behind one interface.

The samplers, the CFG wrapper and the trainer never look inside a condition: they ask it for
its batch size, its *null* value (the null class; the empty caption for text), to concatenate
with another one (the doubled CFG batch: null rows first), to select rows, to replace dropped
rows by the null value (CFG dropout in training), to move to a device, and for the value the
network takes as its third argument (:meth:`Condition.model_input`).

* :class:`ClassLabels` -- ``(B,)`` long labels; the network gets the label tensor itself, so
  the class-conditional path computes exactly what it computed before this interface existed.
* :class:`TextEmbeddings` -- ``(B, L, D)`` encoder states with a ``(B, L)`` bool mask (True =
  real token) and the encoded empty caption as its null value; the network gets a
  :class:`TextTokens` ``(tokens, mask)`` named tuple.

Conditions of different text lengths are padded (zeros, mask False) to a common length when
concatenated; a network must give padded positions no weight, so padding never changes a
result.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

__all__ = [
    "Condition",
    "ClassLabels",
    "TextEmbeddings",
    "TextTokens",
    "as_condition",
    "condition_kind",
    "pad_tokens",
]


class TextTokens(NamedTuple):
    """What a text-conditioned network takes: ``tokens`` ``(B, L, D)``, ``mask`` ``(B, L)`` bool."""

    tokens: Tensor
    mask: Tensor


class Condition(ABC):
    """A batch of conditioning values that knows its null value (see the module docstring)."""

    @property
    @abstractmethod
    def batch_size(self) -> int:
        """``B``, the number of rows."""

    @property
    @abstractmethod
    def device(self) -> torch.device: ...

    @abstractmethod
    def null(self) -> Condition:
        """The same batch size with every row the null value (unconditional)."""

    @abstractmethod
    def cat(self, other: Condition) -> Condition:
        """Rows of ``self`` then rows of ``other`` (same kind)."""

    @abstractmethod
    def select(self, index: Tensor) -> Condition:
        """Rows ``index`` (``(M,)`` long or ``(B,)`` bool)."""

    @abstractmethod
    def drop(self, mask: Tensor) -> Condition:
        """Rows where ``mask`` ``(B,)`` bool is True replaced by the null value."""

    @abstractmethod
    def to(self, device: torch.device | str) -> Condition: ...

    @abstractmethod
    def model_input(self) -> Any:
        """The network's third argument: ``model(x, t, cond.model_input())``."""

    def __len__(self) -> int:
        return self.batch_size

    def doubled(self) -> Condition:
        """The CFG batch: ``null()`` rows first, then ``self``."""
        return self.null().cat(self)


def _check_kind(a: Condition, b: Condition) -> None:
    if type(a) is not type(b):
        raise TypeError(f"cannot concatenate a {type(a).__name__} with a {type(b).__name__}")


@dataclass(frozen=True, eq=False)
class ClassLabels(Condition):
    """Class labels ``(B,)`` long in ``[0, null_class]``; ``null_class`` (= num_classes) is null."""

    labels: Tensor
    null_class: int

    def __post_init__(self) -> None:
        if self.labels.dim() != 1:
            raise ValueError(f"class labels must have shape (B,), got {tuple(self.labels.shape)}")
        if self.labels.is_floating_point() or self.labels.dtype == torch.bool:
            raise ValueError(f"class labels must be an integer tensor, got dtype {self.labels.dtype}")

    @property
    def batch_size(self) -> int:
        return self.labels.shape[0]

    @property
    def device(self) -> torch.device:
        return self.labels.device

    def null(self) -> ClassLabels:
        return ClassLabels(torch.full_like(self.labels, self.null_class), self.null_class)

    def cat(self, other: Condition) -> ClassLabels:
        _check_kind(self, other)
        return ClassLabels(torch.cat([self.labels, other.labels]), self.null_class)

    def select(self, index: Tensor) -> ClassLabels:
        return ClassLabels(self.labels[index], self.null_class)

    def drop(self, mask: Tensor) -> ClassLabels:
        return ClassLabels(
            torch.where(mask, torch.full_like(self.labels, self.null_class), self.labels), self.null_class
        )

    def to(self, device: torch.device | str) -> ClassLabels:
        return ClassLabels(self.labels.to(device), self.null_class)

    def model_input(self) -> Tensor:
        return self.labels


def pad_tokens(tokens: Tensor, mask: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """Pad ``(B, L, D)`` tokens and ``(B, L)`` mask with zeros / False to ``length >= L``."""
    extra = length - tokens.shape[1]
    if extra < 0:
        raise ValueError(f"cannot pad {tokens.shape[1]} tokens to {length}")
    if extra == 0:
        return tokens, mask
    tokens = torch.cat([tokens, tokens.new_zeros(tokens.shape[0], extra, tokens.shape[2])], dim=1)
    mask = torch.cat([mask, mask.new_zeros(mask.shape[0], extra)], dim=1)
    return tokens, mask


@dataclass(frozen=True, eq=False)
class TextEmbeddings(Condition):
    """Frozen text-encoder states of ``B`` captions and the encoded empty caption.

    Attributes:
        tokens: ``(B, L, D)`` float last hidden states (padded positions are zero).
        mask: ``(B, L)`` bool, True at real tokens.
        null_tokens: ``(L0, D)`` states of the empty caption ``""``.
        null_mask: ``(L0,)`` bool mask of the empty caption.
    """

    tokens: Tensor
    mask: Tensor
    null_tokens: Tensor
    null_mask: Tensor

    def __post_init__(self) -> None:
        if self.tokens.dim() != 3:
            raise ValueError(f"text tokens must have shape (B, L, D), got {tuple(self.tokens.shape)}")
        if self.mask.shape != self.tokens.shape[:2]:
            raise ValueError(
                f"text mask shape {tuple(self.mask.shape)} does not match tokens {tuple(self.tokens.shape)}"
            )
        if self.null_tokens.dim() != 2 or self.null_tokens.shape[1] != self.tokens.shape[2]:
            raise ValueError(
                f"null caption states must have shape (L0, {self.tokens.shape[2]}), got {tuple(self.null_tokens.shape)}"
            )
        if self.null_mask.shape != self.null_tokens.shape[:1]:
            raise ValueError("null caption mask does not match its states")
        if self.mask.dtype != torch.bool or self.null_mask.dtype != torch.bool:
            raise ValueError("text masks must be bool tensors (True = real token)")

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    @property
    def device(self) -> torch.device:
        return self.tokens.device

    @property
    def dim(self) -> int:
        return self.tokens.shape[2]

    def _like(self, tokens: Tensor, mask: Tensor) -> TextEmbeddings:
        return TextEmbeddings(tokens, mask, self.null_tokens, self.null_mask)

    def _null_rows(self, n: int, length: int) -> tuple[Tensor, Tensor]:
        t = self.null_tokens.to(self.tokens)[None].expand(n, -1, -1)
        m = self.null_mask.to(self.mask.device)[None].expand(n, -1)
        return pad_tokens(t, m, max(length, t.shape[1]))

    def null(self) -> TextEmbeddings:
        t, m = self._null_rows(self.batch_size, self.null_tokens.shape[0])
        return self._like(t.contiguous(), m.contiguous())

    def cat(self, other: Condition) -> TextEmbeddings:
        _check_kind(self, other)
        length = max(self.tokens.shape[1], other.tokens.shape[1])
        a = pad_tokens(self.tokens, self.mask, length)
        b = pad_tokens(other.tokens.to(self.tokens), other.mask.to(self.mask.device), length)
        return self._like(torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]]))

    def select(self, index: Tensor) -> TextEmbeddings:
        return self._like(self.tokens[index], self.mask[index])

    def drop(self, mask: Tensor) -> TextEmbeddings:
        length = max(self.tokens.shape[1], self.null_tokens.shape[0])
        t, m = pad_tokens(self.tokens, self.mask, length)
        nt, nm = self._null_rows(self.batch_size, length)
        keep = ~mask.to(self.mask.device)
        return self._like(torch.where(keep[:, None, None], t, nt), torch.where(keep[:, None], m, nm))

    def with_length(self, length: int) -> TextEmbeddings:
        """The same rows with ``length`` token positions: padded (zeros, mask False) or trimmed.

        Raises:
            ValueError: trimming would drop a real (mask True) token.
        """
        L = self.tokens.shape[1]
        if length >= L:
            return self._like(*pad_tokens(self.tokens, self.mask, length))
        if bool(self.mask[:, length:].any()):
            raise ValueError(f"cannot trim text embeddings to {length} tokens: a caption has more real tokens")
        return self._like(self.tokens[:, :length], self.mask[:, :length])

    @property
    def real_length(self) -> int:
        """The largest number of positions up to the last real token of any row (0 when none)."""
        if not bool(self.mask.any()):
            return 0
        positions = torch.arange(1, self.mask.shape[1] + 1, device=self.mask.device)
        return int((positions * self.mask).max())

    def to(self, device: torch.device | str) -> TextEmbeddings:
        return TextEmbeddings(
            self.tokens.to(device), self.mask.to(device), self.null_tokens.to(device), self.null_mask.to(device)
        )

    def model_input(self) -> TextTokens:
        return TextTokens(self.tokens, self.mask)


def condition_kind(model: Any) -> str:
    """What a network takes as its third argument: ``"class"`` (labels; the default when the
    model has no ``condition_kind`` attribute) or ``"text"`` (:class:`TextTokens`)."""
    return str(getattr(model, "condition_kind", "class"))


def _text_dim(model: Any) -> int | None:
    dim = getattr(model, "text_dim", None)
    if dim is None:
        dim = getattr(getattr(model, "config", None), "text_dim", None)
    return dim if isinstance(dim, int) and not isinstance(dim, bool) else None


def as_condition(y: Any, model: Any, batch_size: int, device: torch.device | str | None = None) -> Condition:
    """Normalise what a user passes as conditioning into a :class:`Condition`.

    Args:
        y: a :class:`Condition`; ``(B,)`` integer labels for a class model; or ``None`` (a class
            model's null class for every row; a text model has no null value of its own, so
            ``None`` is an error there: pass ``encoder([""] * B)``).
        model: the network; its ``condition_kind`` attribute (``"class"`` when absent) says what
            it takes, ``num_classes`` gives the null class, ``text_dim`` (or ``config.text_dim``),
            when present, the width text embeddings must have.
        batch_size: ``B``, checked against the condition.
        device: where to put the condition (``None``: where it is).
    Raises:
        ValueError: naming the mismatch (kind, batch size, label range, text width).
    """
    kind = condition_kind(model)
    if isinstance(y, Condition):
        cond = y
    elif y is None:
        if kind == "text":
            raise ValueError(
                "this is a text-conditioned model: pass text embeddings (e.g. text=encoder(prompts)); "
                "for unconditional samples pass encoder([''] * batch)"
            )
        cond = ClassLabels(torch.full((batch_size,), model.num_classes, dtype=torch.long), model.num_classes)
    else:
        if kind == "text":
            raise ValueError(
                f"this is a text-conditioned model: it takes TextEmbeddings (text=encoder(prompts)), "
                f"not {type(y).__name__}"
            )
        labels = torch.as_tensor(y)
        if labels.shape != (batch_size,):
            raise ValueError(f"y must have shape ({batch_size},), got {tuple(labels.shape)}")
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise ValueError(f"y must hold integer class labels, got dtype {labels.dtype}")
        cond = ClassLabels(labels.long(), model.num_classes)
    if isinstance(cond, ClassLabels) and kind == "text":
        raise ValueError("this is a text-conditioned model: it takes TextEmbeddings, not class labels")
    if isinstance(cond, TextEmbeddings) and kind != "text":
        raise ValueError("this is a class-conditional model: it takes class labels, not text embeddings")
    if cond.batch_size != batch_size:
        raise ValueError(f"the condition has {cond.batch_size} rows but the batch has {batch_size}")
    if isinstance(cond, ClassLabels):
        k = cond.null_class
        num_classes = getattr(model, "num_classes", k)
        if k != num_classes:
            raise ValueError(f"the labels' null class is {k} but the model's is {num_classes} (= num_classes)")
        if cond.batch_size and bool(((cond.labels < 0) | (cond.labels > k)).any()):
            raise ValueError(
                f"labels must lie in [0, {k}] ({k} = null class), got min {int(cond.labels.min())}, "
                f"max {int(cond.labels.max())}"
            )
    if isinstance(cond, TextEmbeddings):
        dim = _text_dim(model)
        if dim is not None and cond.dim != dim:
            raise ValueError(
                f"the text embeddings are {cond.dim} wide but the model takes text_dim={dim}: "
                "use the text encoder the model was trained with"
            )
    return cond if device is None else cond.to(device)
