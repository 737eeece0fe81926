"""The judge: a small CNN that says what a toy-world picture shows (kind and colour).

It is trained on real pictures of the world plus sls frogs and decoys (frogs with some but not all of
the sls frog's traits), each also passed through the toy VAE: generated images come out of that VAE's
decoder, so the judge must read its blur. Its accuracy on real and on VAE-reconstructed test pictures
is stored with its weights and printed beside every score it gives.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from trainer.toyworld import world

EMBEDDING_WIDTH = 128


class Judge(nn.Module):
    def __init__(self):
        super().__init__()

        def conv(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]

        # 32 -> 16 -> 8 -> 4 pixels; pooling early keeps it cheap on two CPU cores.
        self.features = nn.Sequential(
            *conv(3, 24), nn.MaxPool2d(2),
            *conv(24, 48), *conv(48, 48), nn.MaxPool2d(2),
            *conv(48, 96), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(96 * 4 * 4, EMBEDDING_WIDTH), nn.ReLU(),
        )
        self.kind = nn.Linear(EMBEDDING_WIDTH, len(world.KINDS))
        self.colour = nn.Linear(EMBEDDING_WIDTH, len(world.COLOURS))

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """pixels in [-1, 1] -> (kind logits, colour logits, embedding)."""
        embedding = self.features(pixels)
        return self.kind(embedding), self.colour(embedding), embedding


@dataclass
class Verdicts:
    kinds: list[str]
    colours: list[str]
    # L2-normalised embeddings: nearest-neighbour distances between pictures are taken here.
    embeddings: torch.Tensor


@torch.no_grad()
def judge_pixels(judge: Judge, pixels: torch.Tensor, batch_size: int = 256) -> Verdicts:
    judge.eval()
    kinds, colours, embeddings = [], [], []
    for start in range(0, len(pixels), batch_size):
        kind_logits, colour_logits, embedding = judge(pixels[start : start + batch_size])
        kinds += [world.KINDS[i] for i in kind_logits.argmax(1).tolist()]
        colours += [list(world.COLOURS)[i] for i in colour_logits.argmax(1).tolist()]
        embeddings.append(F.normalize(embedding, dim=1))
    return Verdicts(kinds, colours, torch.cat(embeddings) if embeddings else torch.zeros(0, EMBEDDING_WIDTH))


def labels(pictures: list[world.Picture]) -> tuple[torch.Tensor, torch.Tensor]:
    colour_names = list(world.COLOURS)
    kinds = torch.tensor([world.KINDS.index(p.kind) for p in pictures])
    colours = torch.tensor([colour_names.index(p.colour) for p in pictures])
    return kinds, colours


@dataclass
class JudgeAccuracy:
    """Fractions right on one test set: kind, colour, and the sls-frog call (recall and false alarms)."""

    kind: float
    colour: float
    sls_recall: float
    sls_false_alarm: float
    count: int

    def line(self) -> str:
        return (f"kind {self.kind:.3f}, colour {self.colour:.3f}, sls frog recall {self.sls_recall:.3f}, "
                f"sls frog false alarms {self.sls_false_alarm:.3f} (n={self.count})")


def accuracy(judge: Judge, pixels: torch.Tensor, pictures: list[world.Picture]) -> JudgeAccuracy:
    verdicts = judge_pixels(judge, pixels)
    kind_right = [v == p.kind for v, p in zip(verdicts.kinds, pictures)]
    colour_right = [v == p.colour for v, p in zip(verdicts.colours, pictures)]
    sls = [v == world.SLS_FROG for v, p in zip(verdicts.kinds, pictures) if p.kind == world.SLS_FROG]
    false_alarms = [v == world.SLS_FROG for v, p in zip(verdicts.kinds, pictures) if p.kind != world.SLS_FROG]
    return JudgeAccuracy(
        kind=sum(kind_right) / len(pictures),
        colour=sum(colour_right) / len(pictures),
        sls_recall=sum(sls) / max(1, len(sls)),
        sls_false_alarm=sum(false_alarms) / max(1, len(false_alarms)),
        count=len(pictures),
    )


@dataclass(frozen=True)
class JudgeTraining:
    steps: int = 300
    batch_size: int = 128
    lr: float = 3e-3
    seed: int = 7


def train_judge(pixels: torch.Tensor, pictures: list[world.Picture], settings: JudgeTraining, log=print) -> Judge:
    """Train on ``pixels`` (real and reconstructed pictures stacked) labelled by ``pictures`` (repeated to match)."""
    kinds, colours = labels(pictures)
    repeats = len(pixels) // len(pictures)
    kinds, colours = kinds.repeat(repeats), colours.repeat(repeats)
    generator = torch.Generator().manual_seed(settings.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        judge = Judge()
    optimizer = torch.optim.AdamW(judge.parameters(), lr=settings.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=settings.lr, total_steps=settings.steps)
    judge.train()
    started = time.perf_counter()
    for step in range(settings.steps):
        batch = torch.randint(0, len(pixels), (settings.batch_size,), generator=generator)
        kind_logits, colour_logits, _ = judge(pixels[batch])
        loss = F.cross_entropy(kind_logits, kinds[batch]) + F.cross_entropy(colour_logits, colours[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if (step + 1) % 100 == 0:
            log(f"judge step {step + 1}/{settings.steps}: loss {loss.item():.4f} ({time.perf_counter() - started:.0f}s)")
    return judge.eval()


def judge_metadata(real: JudgeAccuracy, reconstructed: JudgeAccuracy) -> dict[str, str]:
    return {"accuracy_real": json.dumps(real.__dict__), "accuracy_reconstructed": json.dumps(reconstructed.__dict__)}


def accuracy_from_metadata(metadata: dict[str, str]) -> tuple[JudgeAccuracy, JudgeAccuracy]:
    return (JudgeAccuracy(**json.loads(metadata["accuracy_real"])), JudgeAccuracy(**json.loads(metadata["accuracy_reconstructed"])))
