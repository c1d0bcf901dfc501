"""Small, seeded test models for tests that need a network (no downloads).

Builders:

- :func:`tiny_mlp` - an ``nn.Sequential`` MLP.
- :func:`tiny_resnet` - a ResNet with torchvision's attribute names
  (``conv1, bn1, relu, maxpool, layer1..layer4, avgpool, fc``) and forward.
- :func:`tiny_bert` / :func:`tiny_roberta` - Hugging Face encoders (BERT; RoBERTa,
  XLM-R, CamemBERT) with random weights built from a config (needs ``transformers``).
- :func:`tiny_sentence_transformer` - a sentence-transformers model (tiny BERT
  + mean pooling + normalize) saved to and loaded from a local directory,
  with a small word-level vocabulary (needs ``sentence_transformers``).

Every builder seeds its own generator and returns the model in ``eval()``
mode, so two calls give identical weights.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

__all__ = [
    "VOCAB",
    "BasicBlock",
    "ResNet",
    "TinyResNet",
    "bert_batch",
    "tiny_bert",
    "tiny_mlp",
    "tiny_resnet",
    "tiny_roberta",
    "tiny_sentence_transformer",
]

VOCAB = [
    "[PAD]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[MASK]",
    "the",
    "a",
    "cat",
    "dog",
    "bird",
    "sat",
    "ran",
    "flew",
    "on",
    "over",
    "under",
    "mat",
    "log",
    "tree",
    "far",
    "away",
    "and",
    "then",
    "slept",
    "quickly",
    "slowly",
    "big",
    "small",
    "red",
    "green",
    "blue",
]


def tiny_mlp(seed: int = 0, widths: tuple[int, ...] = (6, 16, 16, 8, 3)) -> nn.Sequential:
    """An MLP ``Linear, ReLU, Linear, ReLU, ..., Linear`` as ``nn.Sequential``."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).eval()


class BasicBlock(nn.Module):
    """torchvision's ``BasicBlock`` (two 3x3 convolutions and a shortcut)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    """A ResNet of :class:`BasicBlock` stages with torchvision's attribute names and ``forward`` order
    (ResNet-18 is ``blocks=(2, 2, 2, 2)``, ResNet-34 ``(3, 4, 6, 3)``, widths 64-512).  Random weights."""

    def __init__(self, blocks: tuple[int, int, int, int] = (2, 2, 2, 2),
                 widths: tuple[int, int, int, int] = (64, 128, 256, 512), num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages = []
        inplanes = widths[0]
        for i, (planes, n) in enumerate(zip(widths, blocks, strict=True)):
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(BasicBlock(inplanes, planes, stride),
                                        *[BasicBlock(planes, planes) for _ in range(n - 1)]))
            inplanes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)
        x = self.maxpool(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


class TinyResNet(ResNet):
    """A small :class:`ResNet` (two blocks per stage) for tests."""

    def __init__(self, widths: tuple[int, int, int, int] = (8, 16, 24, 32), num_classes: int = 5):
        super().__init__((2, 2, 2, 2), widths, num_classes)


def tiny_resnet(seed: int = 0) -> TinyResNet:
    """A seeded :class:`TinyResNet` in eval mode with random BatchNorm statistics."""
    torch.manual_seed(seed)
    model = TinyResNet()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                assert module.running_mean is not None and module.running_var is not None
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.1)
                module.running_mean.normal_(0.0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _encoder_config_kwargs(layers: int, hidden: int, attn: str) -> dict[str, Any]:
    return {
        "vocab_size": len(VOCAB),
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "intermediate_size": 2 * hidden,
        "max_position_embeddings": 64,
        "attn_implementation": attn,
    }


def tiny_bert(
    seed: int = 0,
    layers: int = 4,
    hidden: int = 32,
    attn: str = "sdpa",
    add_pooling_layer: bool = True,
) -> Any:
    """A random ``transformers.BertModel`` (``attn``: ``"sdpa"`` or ``"eager"``)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(**_encoder_config_kwargs(layers, hidden, attn))
    return BertModel(config, add_pooling_layer=add_pooling_layer).eval()


def tiny_roberta(seed: int = 0, layers: int = 4, hidden: int = 32, attn: str = "sdpa", kind: str = "roberta") -> Any:
    """A random RoBERTa-family encoder (position ids derived from padding).

    ``kind`` is ``"roberta"``, ``"xlm-roberta"`` or ``"camembert"``.
    """
    import transformers

    prefix = {"roberta": "Roberta", "xlm-roberta": "XLMRoberta", "camembert": "Camembert"}[kind]
    torch.manual_seed(seed)
    kwargs = _encoder_config_kwargs(layers, hidden, attn)
    kwargs["max_position_embeddings"] = 70  # RoBERTa offsets positions by pad_token_id + 1
    config = getattr(transformers, f"{prefix}Config")(pad_token_id=0, bos_token_id=2, eos_token_id=3, **kwargs)
    return getattr(transformers, f"{prefix}Model")(config).eval()


def bert_batch(lengths: list[int], seed: int = 0, pad_to: int | None = None) -> dict[str, torch.Tensor]:
    """A right-padded batch ``{input_ids, attention_mask, token_type_ids}``.

    Row ``i`` holds ``[CLS] w... [SEP]`` with ``lengths[i]`` tokens in all; the
    tokens of a row depend only on ``seed`` and the row's length, so a sample
    built alone equals the same sample built inside a padded batch.
    """
    width = pad_to if pad_to is not None else max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        gen = torch.Generator().manual_seed(seed * 1000 + n)
        words = torch.randint(5, len(VOCAB), (n - 2,), generator=gen)
        ids[row, :n] = torch.cat([torch.tensor([2]), words, torch.tensor([3])])
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def tiny_sentence_transformer(directory: str | os.PathLike[str], seed: int = 0, layers: int = 4) -> Any:
    """A sentence-transformers model: tiny BERT + mean pooling + normalize.

    The BERT and a word-level tokenizer over :data:`VOCAB` are saved to
    ``directory`` and loaded back through ``sentence_transformers``' own
    ``Transformer`` module, so the result has the real module layout
    (``0.model.encoder.layer.k``; ``0.auto_model`` is a property alias).
    """
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Normalize, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling
    from transformers import BertTokenizer

    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    bert = tiny_bert(seed=seed, layers=layers, attn="sdpa")
    bert.save_pretrained(directory)
    # transformers 5.x: the vocabulary is `vocab=`; `vocab_file=` is silently ignored.
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)})
    tokenizer.save_pretrained(directory)
    hidden = bert.config.hidden_size
    transformer = Transformer(directory)
    model = SentenceTransformer(modules=[transformer, Pooling(hidden), Normalize()], device="cpu")
    return model.eval()
