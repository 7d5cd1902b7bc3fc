"""Autoregressive sampling from decoder language models, with per-layer caches.

The prompt costs one `Model.prefill`: every layer runs it in its sequence-parallel form (as in
training) and hands over the state decoding goes on from. Each new token then costs one
`Model.step`: dense attention appends to a KV cache (O(t) per token), sliding-window attention
writes a rolling window cache (O(w)), the selective SSM advances its recurrent state (O(1),
Mamba §3.4), MoE FFNs are stateless. `use_cache=False` recomputes the full forward on the
whole prefix at every step: the reference the cached path must match.

Sampling (Holtzman et al. 2020 for nucleus sampling, eq. 3): logits / temperature, keep the
k largest (top-k), keep the smallest set of tokens whose probability reaches p (top-p), then
sample; `greedy` takes the argmax. The padding id is never generated: a full forward would
treat it as padding, so cached and uncached decoding would part ways.

RETRO models (`model.retro` set) retrieve each time the sequence completes a chunk: the
`retrieve` callback fetches that chunk's neighbours before the next prediction (RETRO §2.3:
chunk u's neighbours inform the tokens from the last one of chunk u on). Cached, the decoder
self-attention keeps its KV cache and the chunk's neighbours are encoded once, at completion;
uncached, the full forward reruns the encoder over every chunk's neighbours at each step. The
prompt's chunks are retrieved together before its prefill, as the uncached path does.

Shapes: B batch, T prefix length, V vocabulary, m retrieval chunk, K neighbours, R neighbour
length.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from advarch.models.model import Model
from advarch.spec import DataSpec

if TYPE_CHECKING:
    from advarch.trained_lm import LoadedLM

log = logging.getLogger("advarch")
Retrieve = Callable[[torch.Tensor], torch.Tensor]  # chunk ids (B, m) -> neighbours (B, 1, K, R)


def check_sampling(max_new_tokens: int = 0, temperature: float = 1.0, top_k: int | None = None,
                   top_p: float | None = None) -> None:  # fmt: skip
    """ValueError naming the first sampling option out of range (before any model is read)."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
    if temperature < 0.0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 = greedy)")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k={top_k} must be >= 1 or null")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p} must be in (0, 1] or null")


def filter_logits(
    logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """Set every logit outside the top-k and outside the top-p nucleus to −inf.

    Args:
        logits: (B, V), already divided by the temperature.
        top_k: keep the k largest per row (ties at the k-th value are all kept); None = all.
        top_p: keep the smallest prefix of the sorted distribution whose mass reaches p (the
            most likely token always survives); None or 1.0 = all.

    Returns:
        (B, V) logits, a new tensor.
    """
    check_sampling(top_k=top_k, top_p=top_p)
    out = logits.clone()
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        out = out.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = out.sort(dim=-1, descending=True)  # (B, V)
        probs = sorted_logits.softmax(-1)
        mass_before = probs.cumsum(-1) - probs  # mass of strictly more likely tokens
        drop_sorted = mass_before >= top_p  # the first token has mass_before 0: always kept
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return out


def sample_next(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    greedy: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick the next token per row from logits (B, V) → (B,) long."""
    if greedy or temperature == 0.0:
        return logits.argmax(-1)
    check_sampling(temperature=temperature)
    filtered = filter_logits(logits.float() / temperature, top_k, top_p)
    probs = filtered.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class _Decoder:
    """One decoding strategy's state: feed tokens, read next-token logits (B, V)."""

    def __init__(self, model: nn.Module, spec: DataSpec, use_cache: bool,
                 retrieve: Retrieve | None) -> None:  # fmt: skip
        self.model, self.cached = model, use_cache
        self.retrieve = retrieve if getattr(model, "retro", None) is not None else None
        self.chunk = spec.retrieval_chunk
        # a model without `step` (a user's own) sees at most the positions it was trained on
        self.context = None if isinstance(model, Model) else spec.seq_len
        self.neighbours: torch.Tensor | None = None  # (B, L, K, R) full forward and prefill
        self.state: Any = None
        self.tokens: torch.Tensor | None = None  # (B, T) the prefix so far

    def feed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append the prompt (B, T ≥ 1), then one token (B, 1) per call, to the prefix; logits
        (B, V) for the token after them.

        Cached, the prompt goes through `Model.prefill` in one pass (RETRO: with the
        neighbours of every chunk it completes), each later token through `Model.step`.
        """
        self.tokens = tokens if self.tokens is None else torch.cat([self.tokens, tokens], 1)
        if self.cached and self.state is not None:
            return self._step(tokens)
        if self.retrieve is not None:
            self._retrieve_completed_chunks()
        if self.cached:
            logits, self.state = self.model.prefill(tokens, self.neighbours)
            return logits
        tokens = self.tokens if self.context is None else self.tokens[:, -self.context :]
        return self.model(tokens, neighbours=self.neighbours).logits[:, -1]

    def _step(self, token: torch.Tensor) -> torch.Tensor:
        """The newest token (B, 1) through `Model.step`, with the neighbours of the chunk it
        completes (RETRO); logits (B, V)."""
        found = None
        if self.retrieve is not None and self.tokens.shape[1] % self.chunk == 0:
            found = self._retrieve(self.tokens[:, -self.chunk :])
        logits, self.state = self.model.step(token, self.state, found)
        return logits

    def _retrieve(self, chunk: torch.Tensor) -> torch.Tensor:
        """Neighbours (B, 1, K, R) of a completed chunk (B, m)."""
        return self.retrieve(chunk).to(chunk.device)

    def _retrieve_completed_chunks(self) -> None:
        """Query neighbours for every chunk completed since the last call."""
        have = 0 if self.neighbours is None else self.neighbours.shape[1]
        for u in range(have, self.tokens.shape[1] // self.chunk):
            found = self._retrieve(self.tokens[:, u * self.chunk : (u + 1) * self.chunk])
            self.neighbours = (
                found if self.neighbours is None else torch.cat([self.neighbours, found], 1)
            )


@torch.no_grad()
def generate(
    model: nn.Module,
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    greedy: bool = False,
    seed: int | None = None,
    use_cache: bool = True,
    eos_id: int | None = None,
    on_token: Callable[[torch.Tensor], None] | None = None,
    retrieve: Retrieve | None = None,
    spec: DataSpec | None = None,
) -> torch.Tensor:
    """Sample up to `max_new_tokens` continuations of `prompt_ids` from a decoder LM.

    Args:
        model: a decoder LM (put in eval mode here): an `advarch.models.Model` built for `lm`
            data, or any module whose forward(ids) gives a `ModelOutput` (with `spec`).
        prompt_ids: (B, T) or (T,) token ids, T ≥ 1.
        max_new_tokens: tokens to add per row (fewer when every row hit `eos_id`).
        temperature, top_k, top_p, greedy: see `sample_next`.
        seed: seeds a private generator, so a seed gives the same tokens whatever else ran.
        use_cache: incremental decoding with `Model.step`; False recomputes the full forward
            at every step (the reference; the only way for other models, e.g. a user's own,
            which see the last `spec.seq_len` tokens).
        eos_id: stop a row at this id; later positions of that row repeat it.
        on_token: called with each new column (B,) as it is produced (streaming).
        retrieve: RETRO only: chunk ids (B, m) → neighbours (B, 1, K, R); None = no retrieval.
        spec: the data's DataSpec, for a model that does not carry one (`Model.spec`).

    Returns:
        (B, T + n) prompt followed by the n ≤ max_new_tokens new tokens ((T + n,) for 1-D input).
    """
    spec = spec or getattr(model, "spec", None)
    if spec is None or spec.kind != "lm":
        raise ValueError("generation needs a decoder language model (data kind 'lm')")
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    squeeze = prompt_ids.dim() == 1
    tokens = prompt_ids.view(1, -1) if squeeze else prompt_ids
    if tokens.shape[1] == 0:
        raise ValueError("the prompt needs at least one token (e.g. the end-of-document id)")
    model.eval()
    device = next(model.parameters()).device
    tokens = tokens.to(device=device, dtype=torch.long)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    decoder = _Decoder(model, spec, use_cache and isinstance(model, Model), retrieve)
    pad_id = spec.pad_id
    done = torch.zeros(tokens.shape[0], dtype=torch.bool, device=device)
    new: list[torch.Tensor] = []
    logits = decoder.feed(tokens) if max_new_tokens else None
    for i in range(max_new_tokens):
        if pad_id >= 0:
            logits[:, pad_id] = float("-inf")
        token = sample_next(
            logits,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            greedy=greedy,
            generator=generator,
        )
        if eos_id is not None:
            token = token.masked_fill(done, eos_id)
            done |= token == eos_id
        new.append(token)
        if on_token is not None:
            on_token(token)
        if bool(done.all()) or i == max_new_tokens - 1:
            break
        logits = decoder.feed(token[:, None])
    out = torch.cat([tokens, *(t[:, None] for t in new)], dim=1)
    return out[0] if squeeze else out


class StreamDecoder:
    """Token ids → text pieces as they arrive, holding back incomplete multi-byte characters.

    A token may end inside a UTF-8 character (a byte tokenizer's "é" is two tokens; a BPE
    token can hold the end of one CJK character and the start of the next), and decoding it
    alone would print U+FFFD. The ids since the text last ended on a whole character are
    decoded together: what precedes a trailing run of U+FFFD is final (more bytes can only
    complete the last character) and is returned; the rest waits for the ids that complete it,
    or for `flush` (a genuinely invalid byte is printed as U+FFFD then).
    """

    def __init__(self, decode: Callable[[Sequence[int]], str]) -> None:
        self.decode = decode
        self.pending: list[int] = []
        self.returned = 0  # characters of decode(pending) already returned

    def push(self, ids: Sequence[int]) -> str:
        """Add ids; return the text that is now complete ('' while a character is partial)."""
        self.pending.extend(int(i) for i in ids)
        text = self.decode(self.pending)
        final = text.rstrip("\ufffd")
        piece = final[self.returned :]
        if len(final) == len(text):  # on a whole character: start afresh
            self.pending, self.returned = [], 0
        else:
            self.returned = max(self.returned, len(final))
        return piece

    def flush(self) -> str:
        """Whatever is still held, decoded as is."""
        text = self.decode(self.pending)[self.returned :] if self.pending else ""
        self.pending, self.returned = [], 0
        return text


def generate_text(
    lm: LoadedLM,
    prompt: str,
    max_new_tokens: int,
    *,
    stream: Callable[[str], None] | None = None,
    stop_at_eos: bool = True,
    **sampling: Any,
) -> str:
    """Continue `prompt` and return the new text; `stream` receives each decoded piece.

    The prompt is preceded by the end-of-document id, as every training document is, so an
    empty prompt starts a fresh document. `sampling` holds `generate`'s keywords (temperature,
    top_k, top_p, greedy, seed, use_cache).
    """
    ids = [lm.eos_id] if lm.eos_id >= 0 else []
    ids += [int(i) for i in lm.tokenizer.encode_batch([prompt])[0]]
    if isinstance(lm.model, Model) and len(ids) + max_new_tokens > lm.spec.seq_len:
        log.warning("prompt and new tokens reach %d tokens, beyond the %d the model was trained "
                    "on (data.seq_len): positions past them were never trained",
                    len(ids) + max_new_tokens, lm.spec.seq_len)  # fmt: skip
    prompt_ids = torch.tensor(ids, dtype=torch.long)
    pieces = StreamDecoder(lm.tokenizer.decode)
    emit = stream or (lambda text: None)

    def on_token(token: torch.Tensor) -> None:
        if not (stop_at_eos and int(token[0]) == lm.eos_id):
            emit(pieces.push([int(token[0])]))

    out = generate(
        lm.model,
        prompt_ids,
        max_new_tokens,
        eos_id=lm.eos_id if stop_at_eos and lm.eos_id >= 0 else None,
        on_token=on_token,
        retrieve=lm.retrieve,
        spec=lm.spec,
        **sampling,
    )
    emit(pieces.flush())
    new = out[len(ids) :].tolist()
    if stop_at_eos and lm.eos_id in new:
        new = new[: new.index(lm.eos_id)]
    return lm.tokenizer.decode(new)
