"""clipslim.attention: the batch-first attention gives open_clip's outputs and gradients, and changes no weights."""

import copy

import open_clip
import torch
from conftest import seeded_model

from clipslim.attention import use_fast_attention


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, 49000, (6, 16), generator=g)
    tokens[:, 9] = 49407  # end of text inside the context: the causal mask matters
    return torch.randn(6, 3, 32, 32, generator=g), tokens


def _grads(model: torch.nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    images, tokens = _inputs()
    model.zero_grad()
    image, text, scale = model(images, tokens)[:3]
    loss = (scale * image @ text.T).log_softmax(1).diag().mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_same_outputs_and_gradients_as_open_clip():
    stock = seeded_model("tiny-student").model.train()
    fast = copy.deepcopy(stock)
    assert use_fast_attention(fast) == 4  # 2 vision + 2 text blocks
    with torch.no_grad():
        images, tokens = _inputs()
        for ref, got in zip(stock.eval()(images, tokens)[:2], fast.eval()(images, tokens)[:2], strict=True):
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    (l_ref, g_ref), (l_got, g_got) = _grads(stock.train()), _grads(fast.train())
    torch.testing.assert_close(l_got, l_ref)
    assert g_ref.keys() == g_got.keys() and len(g_ref) > 20
    for name in g_ref:
        torch.testing.assert_close(g_got[name], g_ref[name], rtol=1e-4, atol=1e-6, msg=name)


def test_hooked_attention_takes_open_clip_path_and_weights_load_in_stock_open_clip(tmp_path):
    model = seeded_model("tiny-student").model.eval()
    use_fast_attention(model)
    calls = []
    model.visual.transformer.resblocks[0].attn.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        model.encode_image(_inputs()[0])
    assert calls == [1]  # a hook on the attention module still sees its call
    torch.save(model.state_dict(), tmp_path / "w.pt")
    stock = open_clip.create_model("tiny-student")
    stock.load_state_dict(torch.load(tmp_path / "w.pt", weights_only=True))  # same names, nothing extra
    assert set(stock.state_dict()) == set(model.state_dict())
