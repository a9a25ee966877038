"""Cosine distance between student and teacher sentence embeddings, ``1 - cos(e_s, e_t)``, averaged.

The objective of embedding distillation for bi-encoders (Reimers & Gurevych, "Making Monolingual Sentence
Embeddings Multilingual using Knowledge Distillation", 2020, use MSE; cosine ignores scale, which the
pooled embeddings' consumers also do). Zero when the embeddings point the same way, whatever their norms.

YAML:  - {name: embedding_cosine, weight: 1.0}
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from potstill.hookspecs import hookimpl
from potstill.techniques import Loss, Outputs


class EmbeddingCosine(Loss):
    name = "embedding_cosine"
    needs = ("embeddings",)

    def forward(self, student: Outputs, teacher: Outputs, batch: dict[str, Tensor]) -> Tensor:
        student_emb = student.require("embeddings", self.name).float()
        teacher_emb = teacher.require("embeddings", self.name).float()
        if student_emb.shape[-1] != teacher_emb.shape[-1]:
            raise ValueError(f"embedding_cosine: student embeddings have {student_emb.shape[-1]} dimensions, the teacher's "
                             f"{teacher_emb.shape[-1]}; cosine needs the same size (keep the teacher's hidden size)")
        return (1 - F.cosine_similarity(student_emb, teacher_emb, dim=-1)).mean()


@hookimpl
def register_losses(register):
    register(EmbeddingCosine)
