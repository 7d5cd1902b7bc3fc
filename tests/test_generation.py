"""Generation: cached decoding equals full-forward decoding, sampling filters, seeds, streaming."""

from __future__ import annotations

import math

import pytest
import torch

from advarch.data.tokenizer import ByteTokenizer
from advarch.generation import (
    StreamDecoder,
    filter_logits,
    generate,
    generate_text,
    sample_next,
)
from advarch.models import Model
from advarch.models.output import ModelOutput
from advarch.spec import DataSpec
from advarch.trained_lm import load_lm
from tests.cli import Project
from tests.conftest import SMALL_TEXT, TrainedRun

SPEC = DataSpec(kind="lm", vocab_size=40, seq_len=64, eos_id=37, pad_id=38, bos_id=39)
MOE = {"num_experts": 4, "top_k": 2}
ARCHS = {
    "transformer": {},
    "longformer": {"layers": ["swa"], "swa": {"window": 4}},  # window ≪ generated length
    "ssm": {"layers": ["ssm"], "ffn": ["none"], "ssm": {"d_state": 8}},
    "hybrid": {
        "depth": 4,
        "layers": ["ssm", "attn", "ssm", "swa"],
        "ffn": ["dense", "moe"],
        "swa": {"window": 3},
        "moe": MOE,
    },
    "moe": {"ffn": ["moe"], "moe": MOE},
}


def small_model(arch: str, seed: int = 0, spec: DataSpec = SPEC, **extra) -> Model:
    """A float64 model with weights large enough that its next-token choices are sharp."""
    torch.manual_seed(seed)
    kwargs = {"dim": 32, "depth": 2, "num_heads": 2, "ffn_hidden": 48, **ARCHS[arch], **extra}
    model = Model(spec, **kwargs).double().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "conv" not in name:
                p.add_(torch.randn_like(p) * 0.15)
    return model


def greedy_reference(model: Model, prompt: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy decoding the plainest way: full forward on the prefix, argmax, append."""
    seq = prompt
    for _ in range(n):
        logits = model(seq).logits[:, -1].clone()
        logits[:, SPEC.pad_id] = -math.inf
        seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], 1)
    return seq


@pytest.mark.parametrize("arch", list(ARCHS))
def test_cached_greedy_equals_full_forward(arch: str) -> None:
    model = small_model(arch)
    prompt = torch.randint(0, 36, (2, 5), generator=torch.Generator().manual_seed(1))
    cached = generate(model, prompt, 20, greedy=True, use_cache=True)
    full = generate(model, prompt, 20, greedy=True, use_cache=False)
    assert cached.shape == (2, 25)
    assert torch.equal(cached, full)
    assert torch.equal(full, greedy_reference(model, prompt, 20))
    # sampling visits many more states than greedy (which random models drive into loops)
    sampled = [generate(model, prompt, 20, seed=3, use_cache=c) for c in (True, False)]
    assert torch.equal(sampled[0], sampled[1])
    assert len(set(sampled[0][:, 5:].flatten().tolist())) > 8


@pytest.mark.parametrize("arch", ["longformer", "hybrid"])
def test_step_logits_match_forward_past_the_window(arch: str) -> None:
    model = small_model(arch)
    seq = torch.randint(0, 36, (2, 14), generator=torch.Generator().manual_seed(2))
    full = model(seq).logits  # (B, T, V)
    state = model.init_state(2)
    for t in range(seq.shape[1]):
        logits, state = model.step(seq[:, t : t + 1], state)
        torch.testing.assert_close(logits, full[:, t], rtol=1e-9, atol=1e-9)


def filter_logits_reference(row: list[float], top_k: int | None, top_p: float | None) -> list:
    """One row, pure Python: rank by value, keep the top-k, then the nucleus."""
    order = sorted(range(len(row)), key=lambda i: -row[i])
    keep = set(order if top_k is None else [i for i in order if row[i] >= row[order[top_k - 1]]])
    if top_p is not None:
        kept = [i for i in order if i in keep]
        z = sum(math.exp(row[i]) for i in kept)
        mass, nucleus = 0.0, set()
        for i in kept:
            if mass >= top_p:
                break
            nucleus.add(i)
            mass += math.exp(row[i]) / z
        keep = nucleus
    return [row[i] if i in keep else -math.inf for i in range(len(row))]


def test_filters_on_hand_made_logits() -> None:
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]], dtype=torch.float64)
    logits = probs.log()
    keep = lambda out: torch.isfinite(out)[0].tolist()  # noqa: E731
    assert keep(filter_logits(logits, top_k=2)) == [False, True, False, True]
    assert keep(filter_logits(logits, top_k=1)) == [False, True, False, False]
    assert keep(filter_logits(logits, top_p=0.7)) == [False, True, False, True]  # 0.5 + 0.3
    assert keep(filter_logits(logits, top_p=0.9)) == [False, True, True, True]  # + 0.15
    assert keep(filter_logits(logits, top_p=0.01)) == [False, True, False, False]
    assert keep(filter_logits(logits, top_p=1.0)) == [True] * 4
    assert keep(filter_logits(logits, top_k=3, top_p=0.7)) == [False, True, False, True]
    torch.testing.assert_close(filter_logits(logits, top_k=2)[0, 1], logits[0, 1])
    with pytest.raises(ValueError, match="top_p"):
        filter_logits(logits, top_p=0.0)
    with pytest.raises(ValueError, match="top_k"):
        filter_logits(logits, top_k=0)


@pytest.mark.parametrize("seed", range(6))
def test_filters_match_reference(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 17, generator=g, dtype=torch.float64) * 2
    top_k = int(torch.randint(1, 17, (1,), generator=g))
    top_p = float(torch.rand(1, generator=g)) * 0.9 + 0.05
    for k, p in ((top_k, None), (None, top_p), (top_k, top_p)):
        out = filter_logits(logits, top_k=k, top_p=p)
        ref = torch.tensor([filter_logits_reference(r, k, p) for r in logits.tolist()])
        assert torch.equal(torch.isfinite(out), torch.isfinite(ref)), (k, p)


def test_sampling_frequencies_follow_the_filtered_distribution() -> None:
    logits = torch.tensor([0.1, 0.2, 0.3, 0.4]).log().expand(4000, 4)
    draws = sample_next(logits, top_k=2, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=4).double() / len(draws)
    assert counts[:2].sum() == 0
    assert counts[3].item() == pytest.approx(0.4 / 0.7, abs=0.03)
    hot = sample_next(logits, temperature=0.05, generator=torch.Generator().manual_seed(0))
    assert (hot == 3).double().mean() > 0.99  # low temperature sharpens towards the argmax


def test_seed_reproducibility_and_eos() -> None:
    model = small_model("transformer")
    prompt = torch.tensor([1, 2, 3])
    kwargs = dict(temperature=1.0, top_p=0.95)
    a = generate(model, prompt, 30, seed=7, **kwargs)
    torch.manual_seed(123)  # the global RNG must not matter
    b = generate(model, prompt, 30, seed=7, **kwargs)
    c = generate(model, prompt, 30, seed=8, **kwargs)
    assert torch.equal(a, b) and not torch.equal(a, c)
    eos = int(a[6])  # the 4th generated token, used as an end id
    stopped = generate(model, prompt, 30, seed=7, eos_id=eos, **kwargs)
    first = a[3:].tolist().index(eos) + 3
    assert torch.equal(stopped, a[: first + 1])
    assert SPEC.pad_id not in generate(model, prompt, 40, seed=1).tolist()


def test_eos_in_a_batch_keeps_finished_rows_at_eos() -> None:
    model = small_model("ssm")
    prompt = torch.randint(0, 36, (3, 4), generator=torch.Generator().manual_seed(3))
    free = generate(model, prompt, 12, greedy=True)
    eos = int(free[0, 6])
    out = generate(model, prompt, 12, greedy=True, eos_id=eos)
    for row_free, row in zip(free, out, strict=True):
        hits = (row_free[4:] == eos).nonzero()
        if len(hits):
            end = 4 + int(hits[0])
            assert torch.equal(row[: end + 1], row_free[: end + 1])
            assert (row[end:] == eos).all()


RETRO_M, RETRO_K = 4, 2
RETRO_SPEC = DataSpec(
    kind="lm",
    vocab_size=40,
    seq_len=16,
    eos_id=37,
    pad_id=38,
    retrieval_neighbours=RETRO_K,
    retrieval_chunk=RETRO_M,
    retrieval_neighbour_len=2 * RETRO_M,
)
RETRO_ARCHS = {  # decoder stacks with CCA at layer 1, and a hybrid with CCA at 1 and 3
    "transformer": {"retro": {"encoder_depth": 1, "cca_layers": [1]}},
    "hybrid": {"retro": {"encoder_depth": 2, "cca_layers": [1, 3]}},
}


def retro_model(arch: str) -> Model:
    return small_model(arch, spec=RETRO_SPEC, **RETRO_ARCHS[arch])


def fake_retrieve(chunk: torch.Tensor) -> torch.Tensor:
    """(B, m) -> (B, 1, K, R): a deterministic function of the chunk, with some padding."""
    k, r = RETRO_K, 2 * RETRO_M
    nb = ((chunk.repeat(1, k * 2) * 7 + torch.arange(k * r)) % 36).view(-1, 1, k, r)
    return nb.masked_fill(nb % 5 == 0, RETRO_SPEC.pad_id)


@pytest.mark.parametrize("arch", list(RETRO_ARCHS))
def test_retro_step_logits_match_forward(arch: str) -> None:
    model = retro_model(arch)
    seq = torch.randint(0, 36, (2, 15), generator=torch.Generator().manual_seed(4))
    m = RETRO_M
    chunks = [seq[:, u * m : (u + 1) * m] for u in range(seq.shape[1] // m)]
    full = model(seq, neighbours=torch.cat([fake_retrieve(c) for c in chunks], 1)).logits
    state = model.init_state(2)
    for t in range(seq.shape[1]):
        found = fake_retrieve(chunks[t // m]) if (t + 1) % m == 0 else None
        logits, state = model.step(seq[:, t : t + 1], state, found)
        torch.testing.assert_close(logits, full[:, t], rtol=1e-9, atol=1e-9)
    assert not torch.allclose(full, model(seq).logits)  # the neighbours did change the output


@pytest.mark.parametrize("use_cache", [True, False])
def test_retro_retrieves_at_each_completed_chunk(use_cache: bool) -> None:
    m = RETRO_M
    model = retro_model("transformer")
    calls: list[torch.Tensor] = []

    def retrieve(chunk: torch.Tensor) -> torch.Tensor:  # (B, m) -> (B, 1, K, R)
        calls.append(chunk.clone())
        return fake_retrieve(chunk)

    prompt = torch.tensor([[1, 2, 3], [4, 5, 6]])
    out = generate(model, prompt, 10, greedy=True, retrieve=retrieve, use_cache=use_cache)
    assert len(calls) == (out.shape[1] - 1) // m == 3  # the last token is never fed back
    for u, chunk in enumerate(calls):
        assert torch.equal(chunk, out[:, u * m : (u + 1) * m])
    seq, nb = out[:, :-1], torch.cat([fake_retrieve(c) for c in calls], 1)
    last = model(seq, neighbours=nb).logits[:, -1]
    last[:, RETRO_SPEC.pad_id] = -math.inf
    assert torch.equal(last.argmax(-1), out[:, -1])  # the final prediction saw all neighbours


@pytest.mark.parametrize("arch", list(RETRO_ARCHS))
def test_retro_cached_decoding_equals_full_forward(arch: str) -> None:
    model = retro_model(arch)
    prompt = torch.randint(0, 36, (2, 6), generator=torch.Generator().manual_seed(5))
    runs = {
        (c, greedy): generate(
            model, prompt, 17, greedy=greedy, seed=3, use_cache=c, retrieve=fake_retrieve
        )
        for c in (True, False)
        for greedy in (True, False)
    }
    assert torch.equal(runs[True, True], runs[False, True])
    assert torch.equal(runs[True, False], runs[False, False])
    no_retrieval = generate(model, prompt, 17, seed=3)
    assert not torch.equal(no_retrieval, runs[True, False])


def test_retro_step_refuses_neighbours_off_a_chunk_boundary() -> None:
    model = retro_model("transformer")
    state = model.init_state(1)
    with pytest.raises(ValueError, match="completes none"):
        model.step(torch.tensor([[3]]), state, fake_retrieve(torch.ones(1, RETRO_M).long()))


def test_stream_decoder_holds_partial_utf8() -> None:
    tok = ByteTokenizer()
    text = "héllo € 😀 ok"
    decoder = StreamDecoder(tok.decode)
    pieces = [decoder.push([int(i)]) for i in tok.encode_batch([text])[0]] + [decoder.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert pieces[1] == "" and pieces[2] == "é"  # é is two bytes
    bad = StreamDecoder(tok.decode)
    assert "".join([bad.push([0xFF]) for _ in range(4)] + [bad.flush()]) == "\ufffd" * 4


def test_bench_script_times_every_model_including_retro(project: Project) -> None:
    small = ",".join(f"'{o}'" for o in ["debug=tiny", *SMALL_TEXT])  # quoted: '=' inside
    args = [
        "bench=true",
        "bench_models=[ssm,retro]",
        f"bench_overrides=[{small}]",
        "bench_prompt_len=4",
        "bench_new_tokens=70",
    ]
    done = project.run(*args, script="scripts/generate.py").check()
    rows = [line for line in done.stdout.splitlines() if line.startswith(("| ssm", "| retro"))]
    assert len(rows) == 2
    assert all(float(row.split("|")[3]) > 0 for row in rows)
    # debug=tiny shrinks the models, as in train.py (they were benchmarked at full size)
    assert all(float(row.split("|")[2].strip().rstrip("M")) < 0.1 for row in rows), rows


# -- checkpoints and the script ---------------------------------------------------------------
def test_generate_from_a_trained_checkpoint(trained: dict[str, TrainedRun]) -> None:
    """A Lightning-written checkpoint of a CLI run: greedy decoding equals a hand-written argmax
    loop over full forwards, and sampling draws the same tokens with and without the cache."""
    lm = load_lm(str(trained["lm"].ckpt))
    prompt = "def fib(n):"
    ids = torch.tensor(lm.tokenizer.encode_batch([prompt])[0]).unsqueeze(0)
    with torch.no_grad():
        for _ in range(16):
            ids = torch.cat([ids, lm.model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    expected = lm.tokenizer.decode(ids[0, -16:].tolist())
    pieces: list[str] = []
    greedy = generate_text(lm, prompt, 16, stream=pieces.append, greedy=True, stop_at_eos=False)
    assert greedy == expected and "".join(pieces) == greedy
    sampled = generate_text(lm, prompt, 24, seed=0, stop_at_eos=False, top_p=0.9)
    again = generate_text(lm, prompt, 24, seed=0, stop_at_eos=False, top_p=0.9, use_cache=False)
    assert again == sampled != greedy[:24]


def test_generating_past_the_trained_context_says_so(trained: dict[str, TrainedRun],
                                                     caplog) -> None:  # fmt: skip
    lm = load_lm(str(trained["lm"].ckpt))
    with caplog.at_level("WARNING", logger="advarch"):
        generate_text(lm, "x", 4, greedy=True)
    assert not caplog.text
    generate_text(lm, "x" * lm.spec.seq_len, 4, greedy=True)
    assert f"beyond the {lm.spec.seq_len} the model was trained on" in caplog.text


def test_a_warning_comes_before_the_streamed_text(
    project: Project, trained: dict[str, TrainedRun]
) -> None:
    # (the prompt was echoed, then generation warned of a length beyond the trained context:
    # `def fib(n):WARNING: …` cut the text in two)
    ckpt = trained["lm"].ckpt
    seq_len = load_lm(str(ckpt)).spec.seq_len
    typed = f"""'prompt="def fib(n):"' max_new_tokens={seq_len} greedy=true"""
    out = project.shell(f"python scripts/generate.py ckpt_path={ckpt} {typed} 2>&1").check()
    lines = out.stdout.splitlines()
    (warning,) = [i for i, line in enumerate(lines) if "beyond the" in line]
    assert lines[warning + 1].startswith("def fib(n):") and "def fib(n):" not in lines[warning]


def test_script_errors_are_one_line(project: Project) -> None:
    out = project.run(f"ckpt_path={project.root}/nope.ckpt", script="scripts/generate.py")
    assert out.rc != 0
    assert out.stderr.strip().splitlines()[-1].startswith("error: ckpt_path=")
    assert "Traceback" not in out.stderr


class CountingLM(torch.nn.Module):
    """A user's own LM (no `spec`, no `step`): predicts the last token + 1; refuses inputs
    longer than the positions it was trained on."""

    def __init__(self, spec: DataSpec) -> None:
        super().__init__()
        self.spec_len, self.vocab = spec.seq_len, spec.vocab_size
        self.bias = torch.nn.Parameter(torch.zeros(()))

    def forward(self, input_ids: torch.Tensor, **unused) -> ModelOutput:
        assert input_ids.shape[1] <= self.spec_len, "longer than the trained context"
        nxt = (input_ids + 1) % self.vocab
        logits = torch.nn.functional.one_hot(nxt, self.vocab).float() + self.bias
        return ModelOutput(logits=logits, aux_loss=logits.new_zeros(()))


def test_any_lm_module_generates_by_full_forward_within_its_context() -> None:
    spec = DataSpec(kind="lm", vocab_size=40, seq_len=4)
    out = generate(CountingLM(spec), torch.tensor([0]), 20, greedy=True, spec=spec)
    assert out.tolist() == list(range(21))
    with pytest.raises(ValueError, match="decoder language model"):
        generate(CountingLM(spec), torch.tensor([0]), 2)  # no spec to go by


def test_stream_decoder_multibyte_tokens_straddling_characters() -> None:
    """A BPE token may hold several bytes and end inside a character (byte-level BPE learns
    merges like "last byte of one CJK character + first two bytes of the next"). Streaming must
    still print exactly the text the whole sequence decodes to: what is printed is the decode
    of the pieces' concatenation, never a U+FFFD for a character that later tokens complete.
    With 4 ids held at most (a byte-tokenizer's bound), a run of straddling multi-byte tokens
    is cut mid-character and both halves print as U+FFFD."""
    text = "伪乑上仨仃伟与东仗仞仢乱伩乥亼丕伐人义们"  # 3-byte characters
    data = text.encode("utf-8")
    # pieces of 2, then 3 bytes: every piece ends one byte before a character's end
    pieces = [data[:2]] + [data[i : i + 3] for i in range(2, len(data), 3)]

    def decode(ids: list[int]) -> str:  # lossy, as `tokenizers`' ByteLevel decoder is
        return b"".join(pieces[i] for i in ids).decode("utf-8", errors="replace")

    assert decode(list(range(len(pieces)))) == text
    decoder = StreamDecoder(decode)
    streamed = [decoder.push([i]) for i in range(len(pieces))] + [decoder.flush()]
    assert "".join(streamed) == text
    assert all(streamed[1:-1]), streamed  # a character as soon as its last byte arrives
