"""The slot-state forward pass against transformers' own NemotronH forward, on the tiny checkpoint."""

from __future__ import annotations

import pytest
import torch

from model.forward import SlotForward
from model.loader import load_model
from model.state_pool import MAMBA, StatePool
from tests.model.kernels.helpers import run_python, skip_without_triton

TOKENS = 40


@pytest.fixture(scope="module")
def model(tiny_path):
    model, _, _ = load_model(str(tiny_path), None, "cpu", "float32")
    return model


def forward_for(model, slots: int = 4) -> SlotForward:
    lm = model.language_model
    return SlotForward(lm, StatePool(lm.config, slots, 256, torch.float32, torch.float32, torch.device("cpu")))


def embeds(model, seed: int, n: int = TOKENS) -> torch.Tensor:
    ids = torch.randint(20, model.config.text_config.vocab_size, (n,), generator=torch.Generator().manual_seed(seed))
    return model.embed_tokens(ids)


@torch.inference_mode()
def native_last_logits(model, x: torch.Tensor) -> torch.Tensor:
    return model.language_model(inputs_embeds=x[None], use_cache=False).logits[0, -1].float()


@pytest.fixture
def slow_heads(model):
    """Every Mamba head's time step below time_step_min (1e-3), as for some heads of the real checkpoint."""
    mixers = [b.mixer for b in model.language_model.model.layers if b.block_type == MAMBA]
    saved = [m.dt_bias.detach().clone() for m in mixers]
    with torch.no_grad():
        for m in mixers:
            m.dt_bias.fill_(-9.0)  # softplus(-9 + dt) is about 1e-4
    yield
    with torch.no_grad():
        for m, bias in zip(mixers, saved):
            m.dt_bias.copy_(bias)


def test_prefill_matches_transformers(model):
    x = embeds(model, 0)
    ours = forward_for(model).prefill([0], [x], [0])[0]
    torch.testing.assert_close(ours, native_last_logits(model, x), rtol=1e-4, atol=1e-4)


def test_chunked_prefill_equals_one_prefill(model):
    x, fwd = embeds(model, 1), forward_for(model)
    whole = fwd.prefill([0], [x], [0])
    for start in range(0, TOKENS, 7):  # chunks cut across the Mamba chunk size (16) and the conv width
        chunked = fwd.prefill([1], [x[start:start + 7]], [start])
    torch.testing.assert_close(chunked, whole, rtol=1e-4, atol=1e-4)


def test_chunks_of_several_sequences_in_one_pass_equal_each_alone(model):
    """Right padding never reaches a sequence: batched chunks of unequal lengths, one of them
    continuing an earlier chunk, give each sequence what it gets alone (logits and every state)."""
    prompts = [embeds(model, 20 + i, n) for i, n in enumerate((33, 5, 20))]
    alone, together = forward_for(model), forward_for(model)
    alone.prefill([2], [prompts[2][:9]], [0])
    together.prefill([2], [prompts[2][:9]], [0])
    expected = torch.cat([alone.prefill([0], [prompts[0]], [0]), alone.prefill([1], [prompts[1]], [0]),
                          alone.prefill([2], [prompts[2][9:]], [9])])
    got = together.prefill([0, 1, 2], [prompts[0], prompts[1], prompts[2][9:]], [0, 0, 9])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    for pool_alone, pool_together in ((alone.pool.conv, together.pool.conv), (alone.pool.ssm, together.pool.ssm)):
        for layer in pool_alone:
            torch.testing.assert_close(pool_together[layer][:3], pool_alone[layer][:3], rtol=1e-4, atol=1e-5)
    assert together.pool.lengths[:3] == alone.pool.lengths[:3] == [33, 5, 20]
    # ...and the next decoding step agrees too.
    torch.testing.assert_close(together.decode([0, 1, 2], [40, 41, 42]), alone.decode([0, 1, 2], [40, 41, 42]),
                               rtol=1e-4, atol=1e-4)


def first_mamba_layer(model) -> int:
    return next(i for i, b in enumerate(model.language_model.model.layers) if b.block_type == MAMBA)


def test_prefill_then_decode_equals_longer_prefill_with_slow_heads(model, slow_heads):
    """The time step is limited by time_step_limit (0, inf) in both paths, so a prompt's recurrent
    state is the one decoding would have built token by token."""
    ids = torch.randint(20, 600, (TOKENS + 1,), generator=torch.Generator().manual_seed(2))
    x, layer = model.embed_tokens(ids), first_mamba_layer(model)
    fwd = forward_for(model)
    longer = fwd.prefill([0], [x], [0])
    fwd.prefill([1], [x[:TOKENS]], [0])
    stepped = fwd.decode([1], [int(ids[TOKENS])])
    torch.testing.assert_close(fwd.pool.ssm[layer][1], fwd.pool.ssm[layer][0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(stepped, longer, rtol=1e-4, atol=1e-4)


def test_transformers_native_mixer_makes_the_prompt_state_too_large(model, slow_heads):
    """What the fix avoids: transformers' chunked (prompt) path clamps the time step at time_step_min."""
    x, layer = embeds(model, 3), first_mamba_layer(model)
    with torch.inference_mode():
        cache = model.language_model(inputs_embeds=x[None], use_cache=True).cache
    native = cache.get_recurrent_state(layer, state_idx=0)[0]
    fwd = forward_for(model)
    fwd.prefill([0], [x], [0])
    ours = fwd.pool.ssm[layer][0]
    assert native.norm() > 3 * ours.norm()


def test_decode_in_any_slots_equals_decode_in_rows(model):
    """Slots 0..n-1 (views of the pool) and scattered slots (gathered) give the same step."""
    fwd = forward_for(model, slots=6)
    prompts = [embeds(model, 10 + i, n) for i, n in enumerate((9, 23, 16))]
    fwd.prefill([0, 1, 2], prompts, [0, 0, 0])
    fwd.prefill([5, 3, 4], prompts, [0, 0, 0])
    tokens = [31, 32, 33]
    rows = fwd.decode([0, 1, 2], tokens)
    scattered = fwd.decode([5, 3, 4], tokens)
    torch.testing.assert_close(scattered, rows, rtol=1e-5, atol=1e-5)
    # ...and the same as each sequence decoded alone.
    alone = torch.cat([forward_for(model).prefill([0], [torch.cat([x, model.embed_tokens(torch.tensor([t]))])], [0])
                       for x, t in zip(prompts, tokens)])
    torch.testing.assert_close(rows, alone, rtol=1e-4, atol=1e-4)


def run_forward_with_and_without_triton(tiny_path: str) -> None:
    """Subprocess entry (TRITON_INTERPRET=1): the same prefill chunks and decode steps through the Triton
    kernels and through their PyTorch twins give the same logits and the same slot states."""
    from model.kernels import backend

    model, _, _ = load_model(tiny_path, None, "cpu", "float32")

    def run():
        fwd = forward_for(model, slots=4)
        a, b = embeds(model, 11, 30), embeds(model, 12, 9)
        out = [fwd.prefill([2, 0], [a[:20], b], [0, 0]), fwd.prefill([2], [a[20:]], [20])]
        for step in range(3):
            out.append(fwd.decode([0, 2], [5 + step, 9 + step]))
        states = [t.clone() for pool in (fwd.pool.conv, fwd.pool.ssm, fwd.pool.keys) for t in pool.values()]
        return out, states

    assert backend.use_triton(torch.zeros(1)), "the interpreter should route CPU tensors to the kernels"
    triton_out, triton_states = run()
    backend.switch_off("compare with the PyTorch path")
    torch_out, torch_states = run()
    for got, want in zip(triton_out + triton_states, torch_out + torch_states):
        torch.testing.assert_close(got, want, rtol=2e-4, atol=2e-4)
    print("interpreter checks passed")


@skip_without_triton
@pytest.mark.slow
def test_the_forward_through_the_triton_kernels_equals_the_pytorch_path(tiny_path):
    proc = run_python("from tests.model.test_forward import run_forward_with_and_without_triton as run; "
                      f"run({str(tiny_path)!r})", TRITON_INTERPRET="1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "interpreter checks passed" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.parametrize("new_length", [1, 2, 12])
def test_a_reused_slot_gives_what_a_fresh_pool_gives(model, new_length):
    """A slot whose previous sequence prefilled a longer prompt and decoded: the next prompt there gets the
    logits, every conv and SSM state and the length that a fresh pool gives it, and so does its next step.
    Short prompts matter: a longer one would push stale conv inputs out of the window on its own."""
    used, fresh = forward_for(model), forward_for(model)
    used.prefill([0, 1, 2], [embeds(model, 40 + i, 30) for i in range(3)], [0, 0, 0])
    for token in (51, 52, 53):
        used.decode([0, 1, 2], [token] * 3)
    new = embeds(model, 50, new_length)
    got, expected = used.prefill([1], [new], [0]), fresh.prefill([1], [new], [0])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for name, pool_used, pool_fresh in (("conv", used.pool.conv, fresh.pool.conv), ("ssm", used.pool.ssm, fresh.pool.ssm)):
        for layer in pool_fresh:
            torch.testing.assert_close(pool_used[layer][1], pool_fresh[layer][1], rtol=1e-5, atol=1e-6,
                                       msg=lambda m, name=name, layer=layer: f"{name} state of layer {layer}: {m}")
    assert used.pool.lengths[1] == fresh.pool.lengths[1] == new_length
    torch.testing.assert_close(used.decode([1], [60]), fresh.decode([1], [60]), rtol=1e-5, atol=1e-5)
