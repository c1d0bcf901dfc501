"""split() on every supported Hugging Face family, built from small configs: head(frozen(x)) == model(x) exactly."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from actstore.engine.read.ragged import PaddedBatch
from actstore.errors import HeadInputError, LeftPaddingError, SplitError
from actstore.models.capture import capture
from actstore.models.split import SplitStates, check_padding, split, split_points
from tests.family_models import DECODERS, TEXT_FAMILIES, image_batch, tiny, token_batch

pytest.importorskip("transformers")

POINTS = {
    "bert": ("embeddings", "encoder.layer"),
    "roberta": ("embeddings", "encoder.layer"),
    "distilbert": ("embeddings", "transformer.layer"),
    "deberta-v2": ("embeddings", "encoder.layer"),
    "gpt2": ("drop", "h"),
    "llama": ("embed_tokens", "layers"),
    "mistral": ("embed_tokens", "layers"),
    "qwen2": ("embed_tokens", "layers"),
    "t5": ("encoder.embed_tokens", "encoder.block"),
    "vit": ("embeddings", "layers"),
}

_MODELS: dict[tuple[str, str], Any] = {}


def model_of(family: str, attn: str = "sdpa") -> Any:
    if (family, attn) not in _MODELS:
        _MODELS[family, attn] = tiny(family, attn=attn)
    return _MODELS[family, attn]


def real(t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return t[mask.bool()]


def param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("family", list(POINTS))
def test_split_points_per_family(family: str) -> None:
    stem, blocks = POINTS[family]
    assert split_points(model_of(family)) == [stem, *(f"{blocks}.{i}" for i in range(4))]


def _cases() -> list[Any]:
    out = []
    for family in TEXT_FAMILIES:
        for left in ([False, True] if family in DECODERS else [False]):
            for lengths in ([6], [5, 9, 3]):
                out.append(pytest.param(family, left, lengths, id=f"{family}-{'left' if left else 'right'}-{len(lengths)}"))
    return out


@pytest.mark.parametrize(("family", "left", "lengths"), _cases())
def test_head_of_frozen_equals_model_on_padded_batches(family: str, left: bool, lengths: list[int]) -> None:
    model = model_of(family)
    batch = token_batch(lengths, left=left)
    mask = batch["attention_mask"]
    with torch.no_grad():
        full = model(**batch, output_hidden_states=True)
        for at in [*split_points(model), 0.5, 1.0]:
            frozen, head = split(model, at)
            states = frozen(**batch)
            assert isinstance(states, SplitStates) and states.attention_mask is mask
            out = head(states)
            torch.testing.assert_close(real(out.last_hidden_state, mask), real(full.last_hidden_state, mask),
                                       rtol=1e-5, atol=1e-5)
            # The frozen part's output is the model's own hidden state there (hidden_states[k + 1] after block k).
            k = split_points(model).index(frozen.at)
            if k < len(split_points(model)) - 1:  # the last one is tied to the normed output
                torch.testing.assert_close(real(states, mask), real(full.hidden_states[k], mask), rtol=1e-5, atol=1e-5)
            # Mapping input (a tokenizer's BatchEncoding) works the same; unknown keys are ignored.
            again = head(frozen({**batch, "not_a_model_argument": 1}))
            torch.testing.assert_close(again.last_hidden_state, out.last_hidden_state, rtol=0, atol=0)


@pytest.mark.parametrize("lengths", [[1], [4, 2]])
def test_vit(lengths: list[int]) -> None:
    model = model_of("vit")
    pixels = image_batch(len(lengths))
    with torch.no_grad():
        full = model(pixel_values=pixels)
        for at in [*split_points(model), 0.5, 1.0]:
            frozen, head = split(model, at)
            out = head(frozen(pixels))
            torch.testing.assert_close(out.last_hidden_state, full.last_hidden_state, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(out.pooler_output, full.pooler_output, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_right_padded_rows_do_not_depend_on_the_batch(family: str) -> None:
    """A sample's recycled states and head output are its own, whatever it was padded with (right padding)."""
    model = model_of(family)
    alone = token_batch([6])
    padded = token_batch([6, 11, 2])
    assert torch.equal(padded["input_ids"][0, :6], alone["input_ids"][0])
    frozen, head = split(model, 0.5)
    with torch.no_grad():
        s_alone, s_padded = frozen(**alone), frozen(**padded)
        o_alone, o_padded = head(s_alone), head(s_padded)
        # what the store holds: the real tokens only, served back right-padded by the collate
        stored = PaddedBatch(s_padded[:1, :6].clone(), torch.ones(1, 6, dtype=torch.bool), torch.tensor([6]))
        o_stored = head(stored)
    torch.testing.assert_close(s_padded[0, :6], s_alone[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(o_padded.last_hidden_state[0, :6], o_alone.last_hidden_state[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(o_stored.last_hidden_state[0], o_alone.last_hidden_state[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", DECODERS)
def test_left_padding_is_refused_for_decoders(family: str) -> None:
    model = model_of(family)
    check_padding(model, token_batch([3, 7])["attention_mask"])  # right padding: fine
    check_padding(model, None)
    with pytest.raises(LeftPaddingError, match="padding_side = 'right'") as info:
        check_padding(model, token_batch([3, 7], left=True)["attention_mask"])
    assert isinstance(info.value, ValueError)


def test_left_padded_decoder_rows_would_depend_on_the_batch() -> None:
    """Why left padding is refused: the same sample gets other states (absolute positions shift)."""
    model = model_of("gpt2")
    frozen, _ = split(model, 0.5)
    with torch.no_grad():
        alone, padded = frozen(**token_batch([3])), frozen(**token_batch([3, 7], left=True))
    assert not torch.allclose(padded[0, -3:], alone[0], atol=1e-3)


@pytest.mark.parametrize("family", ["roberta", "t5"])
def test_left_padding_is_accepted_where_positions_come_from_the_mask(family: str) -> None:
    model = model_of(family)
    pad = model.config.pad_token_id or 0  # RoBERTa counts positions from the pad tokens of input_ids
    alone, padded = token_batch([3], pad=pad), token_batch([3, 7], left=True, pad=pad)
    check_padding(model, padded)  # the batch: RoBERTa's pad ids are checked
    frozen, _ = split(model, 0.5)
    with torch.no_grad():
        torch.testing.assert_close(frozen(**padded)[0, -3:], frozen(**alone)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama", "distilbert"])
def test_eager_attention_too(family: str) -> None:
    model = model_of(family, attn="eager")
    batch = token_batch([4, 8])
    frozen, head = split(model, 0.5)
    with torch.no_grad():
        full = model(**batch)
        out = head(frozen(**batch))
    mask = batch["attention_mask"]
    torch.testing.assert_close(real(out.last_hidden_state, mask), real(full.last_hidden_state, mask), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", TEXT_FAMILIES)
def test_head_accepts_every_collate_form(family: str) -> None:
    model = model_of(family)
    batch = token_batch([5, 2])
    mask = batch["attention_mask"]
    frozen, head = split(model, 0.5)
    with torch.no_grad():
        states = frozen(**batch)
        plain = states.as_subclass(torch.Tensor)
        reference = head(plain, mask).last_hidden_state
        forms = [
            head(states),
            head(PaddedBatch(plain, mask.bool(), mask.sum(1))),
            head((plain, mask)),
            head({"hidden_states": plain, "attention_mask": mask}),
            head(hidden_states=plain, attention_mask=mask),
        ]
    for out in forms:
        torch.testing.assert_close(real(out.last_hidden_state, mask), real(reference, mask), rtol=0, atol=0)
    # Without the mask the head attends to padding (or, causal, gives the same real tokens): the mask matters,
    # so a plain tensor without one is refused unless the caller says there is no padding.
    with pytest.raises(HeadInputError, match="padding=False"):
        head(plain)
    with torch.no_grad():
        unmasked = head(plain, padding=False).last_hidden_state
    if family not in DECODERS:
        assert not torch.allclose(real(unmasked, mask), real(reference, mask), atol=1e-4)


@pytest.mark.parametrize("family", [*TEXT_FAMILIES, "vit"])
def test_parts_share_the_model_parameters_and_only_the_head_trains(family: str) -> None:
    model = tiny(family)
    frozen, head = split(model, 0.5)
    owned = {id(p) for p in model.parameters()}
    f_ids, h_ids = {id(p) for p in frozen.parameters()}, {id(p) for p in head.parameters()}
    assert f_ids <= owned and h_ids <= owned and not f_ids & h_ids
    assert param_count(frozen) + param_count(head) == param_count(model)
    inputs: Any = image_batch(2) if family == "vit" else token_batch([4, 6])
    with torch.no_grad():
        states = frozen(inputs) if family == "vit" else frozen(**inputs)
    head.train()
    head(states).last_hidden_state.sum().backward()
    assert any(p.grad is not None for p in head.parameters())
    assert all(p.grad is None for p in frozen.parameters())


def test_frozen_part_stops_after_the_split_point() -> None:
    model = model_of("llama")
    frozen, _ = split(model, "layers.1")
    calls: list[int] = []
    handles = [layer.register_forward_pre_hook(lambda *_, i=i: calls.append(i)) for i, layer in enumerate(model.layers)]
    try:
        with torch.no_grad():
            got = frozen(**token_batch([3, 5]))
            want = capture(model, token_batch([3, 5]), "layers.1")["layers.1"]
    finally:
        for h in handles:
            h.remove()
    assert calls == [0, 1, 0, 1]
    torch.testing.assert_close(got.as_subclass(torch.Tensor), want, rtol=0, atol=0)


def test_head_leaves_the_model_unchanged() -> None:
    model = model_of("gpt2")
    batch = token_batch([4, 6])
    with torch.no_grad():
        before = model(**batch).last_hidden_state
        frozen, head = split(model, 0.5)
        head(frozen(**batch))
        after = model(**batch).last_hidden_state
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_half_states_are_cast_to_the_head_dtype() -> None:
    model = model_of("llama")
    batch = token_batch([4, 6])
    frozen, head = split(model, 0.5)
    with torch.no_grad():
        states = frozen(**batch)
        out = head(states.half(), batch["attention_mask"]).last_hidden_state
        ref = head(states).last_hidden_state
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-2, atol=1e-2)


def test_unknown_types_and_encoder_decoders_are_refused_with_the_protocol() -> None:
    import transformers as tf

    t5 = tf.T5Model(tf.T5Config(vocab_size=20, d_model=8, d_kv=4, d_ff=8, num_layers=1, num_heads=2))
    with pytest.raises(SplitError, match="T5EncoderModel.*blocks="):
        split(t5, 0.5)
    lm = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=20, n_embd=8, n_layer=2, n_head=2, n_positions=16))
    with pytest.raises(TypeError, match=r"share weights \(task\.lm_head\.weight = frozen parts\.wte\.weight\).*untie_weights=True"):
        split(lm, 0.5)


# -- custom modules: the blocks= protocol ------------------------------------------------------------------


class Residual(nn.Module):
    def __init__(self, dim: int, returns_stream: bool) -> None:
        super().__init__()
        self.ff = nn.Sequential(nn.Linear(dim, dim), nn.Tanh())
        self.returns_stream = returns_stream

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.ff(h) if self.returns_stream else self.ff(h)


class Stack(nn.Module):
    def __init__(self, returns_stream: bool = True, tie: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.returns_stream = returns_stream
        self.embed = nn.Linear(8, 8)
        self.layers = nn.ModuleList(Residual(8, returns_stream) for _ in range(4))
        self.out = nn.Linear(8, 8)
        if tie:
            self.out.weight = self.embed.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for block in self.layers:
            h = block(h) if self.returns_stream else h + block(h)
        return self.out(h)


def test_custom_module_by_naming_its_blocks() -> None:
    model = Stack().eval()
    x = torch.randn(3, 8)
    for at in ["embed", "layers.0", "layers.2", 0.5, 1.0]:
        frozen, head = split(model, at, blocks="layers", stem="embed")
        with torch.no_grad():
            torch.testing.assert_close(head(frozen(x)), model(x), rtol=1e-6, atol=1e-6)
        assert param_count(frozen) + param_count(head) == param_count(model)
    frozen, head = split(model, 0.5, blocks="layers", stem="embed")
    assert frozen.at == "layers.1" and list(head.tail) == ["out"]


def test_custom_module_whose_blocks_return_the_branch_is_refused() -> None:
    model = Stack(returns_stream=False).eval()
    x = torch.randn(3, 8)
    frozen, head = split(model, "layers.1", blocks="layers", stem="embed")
    with pytest.raises(SplitError, match="branch, not the residual stream"):
        frozen(x)
    with pytest.raises(SplitError, match="branch, not the residual stream"):
        head(torch.randn(3, 8))
    _, last = split(model, 1.0, blocks="layers", stem="embed")
    with pytest.raises(SplitError, match="branch"):
        last(torch.randn(3, 8))


def test_custom_module_errors_name_the_protocol() -> None:
    with pytest.raises(SplitError, match="blocks='layers', stem='embed'"):
        split(Stack(), 0.5)
    with pytest.raises(TypeError, match="blocks='nope'"):
        split(Stack(), 0.5, blocks="nope")
    with pytest.raises(ValueError, match="inside block 'layers.1'"):
        split(Stack(), "layers.1.ff", blocks="layers", stem="embed")


def test_tied_weights_between_the_parts() -> None:
    model = Stack(tie=True).eval()
    with pytest.raises(SplitError, match="share weights.*untie_weights=True"):
        split(model, 0.5, blocks="layers", stem="embed")
    x = torch.randn(2, 8)
    with torch.no_grad():
        want = model(x)
    frozen, head = split(model, 0.5, blocks="layers", stem="embed", untie_weights=True)
    assert model.out.weight is not model.embed.weight and head.tail["out"].weight is model.out.weight
    with torch.no_grad():
        torch.testing.assert_close(head(frozen(x)), want, rtol=0, atol=0)


@pytest.mark.parametrize(("family", "at", "pattern"), [
    ("llama", "layers.1.mlp", "inside block 'layers.1'"),
    ("llama", "norm", "not a block boundary"),
    ("gpt2", "h.9", "no module named 'h.9'"),
    ("t5", "encoder.final_layer_norm", "not a block boundary"),
    ("vit", "layers.3.attention", "inside block 'layers.3'"),
    ("distilbert", "transformer.layer.0.ffn", "inside block 'transformer.layer.0'"),
])
def test_bad_split_points_list_the_valid_ones(family: str, at: str, pattern: str) -> None:
    model = model_of(family)
    with pytest.raises(ValueError, match=pattern) as info:
        split(model, at)
    assert str(split_points(model)) in str(info.value)
