import threading
from dataclasses import asdict

import pytest
import torch

from lordo.model import GPT, PRESETS, ModelConfig, model_config, preset_params

NOMINAL = {"blocks": 1.1e6, "nano": None, "tiny": 1e6, "mini": 2.6e6, "small": 10e6, "125m": 125e6, "350m": 350e6,
           "720m": 720e6}


@pytest.mark.parametrize("preset", list(PRESETS))
def test_preset_parameter_counts(preset):
    with torch.device("meta"):
        model = GPT(model_config(preset))
    n = model.num_params()
    if NOMINAL[preset] is None:
        assert n < 0.8e6  # nano: well under 1M, including its 8192-token embedding
    else:
        assert abs(n - NOMINAL[preset]) / NOMINAL[preset] < 0.05, f"{preset}: {n:,}"
    assert model.lm_head.weight is model.embed_tokens.weight
    assert model.flops_per_token(2048) > 6 * n
    c = model.config
    assert preset_params(preset) == n and preset_params(preset, vocab_size=300) == n - (c.vocab_size - 300) * c.d_model


def test_paper_presets_shape():
    cfg = model_config("350m")
    shape = (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.max_seq_len, cfg.vocab_size)
    assert shape == (1024, 24, 16, 2048, 50304)
    assert cfg.d_ff % 256 == 0 and cfg.d_ff >= 8 * cfg.d_model / 3
    assert model_config("nano", vocab_size=300, max_seq_len=64).vocab_size == 300
    assert ModelConfig(**asdict(cfg)) == cfg


def test_unknown_preset_lists_valid_names():
    with pytest.raises(ValueError, match="nano.*tiny.*small"):
        model_config("huge")


def test_init_is_deterministic_and_thread_safe():
    cfg = model_config("nano")
    reference = GPT(cfg, seed=3).state_dict()
    built = {}

    def build(i):
        built[i] = GPT(cfg, seed=3).state_dict()

    threads = [threading.Thread(target=build, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for sd in built.values():
        assert all(torch.equal(sd[k], reference[k]) for k in reference)
    other = GPT(cfg, seed=4).state_dict()
    assert not torch.equal(other["layers.0.mlp.up_proj.weight"], reference["layers.0.mlp.up_proj.weight"])


def test_init_statistics():
    cfg = model_config("small")
    model = GPT(cfg)
    assert abs(model.embed_tokens.weight.std().item() - 0.02) < 1e-3
    residual = model.layers[0].mlp.down_proj.weight.std().item()
    assert abs(residual - 0.02 / (2 * cfg.n_layers) ** 0.5) < 1e-3
    assert torch.all(model.norm.weight == 1)


def test_causal_masking():
    model = GPT(model_config("nano"))
    x = torch.randint(0, 8192, (1, 32))
    y = x.clone()
    y[0, 20] = (x[0, 20] + 1) % 8192
    with torch.no_grad():
        a, b = model(x)[0], model(y)[0]
    assert torch.equal(a[:, :20], b[:, :20])
    assert not torch.allclose(a[:, 20:], b[:, 20:])


def test_loss_matches_cross_entropy_and_ignore_index():
    model = GPT(model_config("nano"))
    x = torch.randint(0, 8192, (2, 16))
    targets = torch.randint(0, 8192, (2, 16))
    targets[:, :5] = -100
    logits, loss = model(x, targets)
    logp = logits.log_softmax(-1)[:, 5:].gather(-1, targets[:, 5:, None])
    torch.testing.assert_close(loss, -logp.mean())


def test_bf16_autocast_forward_backward():
    model = GPT(model_config("nano"))
    x = torch.randint(0, 8192, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, loss = model(x, x)
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    loss.backward()
    assert model.embed_tokens.weight.grad.dtype == torch.float32


def test_block_heavy_preset_keeps_most_parameters_in_the_low_rank_matrices():
    def block_share(preset):
        with torch.device("meta"):
            model = GPT(model_config(preset))
        blocks = sum(p.numel() for name, p in model.named_parameters() if name.startswith("layers.") and p.ndim == 2)
        return blocks / model.num_params()
    assert block_share("blocks") > 0.7 and block_share("125m") > 0.65 and block_share("tiny") < 0.25
