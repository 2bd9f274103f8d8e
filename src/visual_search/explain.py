"""Why does a result match its query? Class activation maps of the similarity itself.

An embedding model has no class to explain, so the explained score is the cosine similarity
between two embeddings. For a pair (query, result), the heatmap on the query is Grad-CAM of
"cosine of this image's embedding to the result's", and the heatmap on the result is the same
with the query's embedding as the target. The maps come from the grad-cam library; the model is
always the embedder's torch model, whichever runtime embeds.

MobileNetV2's ReLU6 activations work in place, which breaks the backward hooks CAM methods put
on the target layer ("a view ... is being modified inplace"); the explainer runs a copy of the
model with every in-place activation turned off, leaving the embedder's model untouched.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import nn

from visual_search.embed import Embedder, split_transform

METHODS = ("gradcam", "gradcam++", "eigencam")


class ExplainError(ValueError):
    """A setting of the explainer is wrong; the message names it."""


class CosineTarget:
    """The score Grad-CAM explains: cosine similarity of the model's output to a fixed vector."""

    def __init__(self, target: np.ndarray | torch.Tensor):
        self.target = torch.as_tensor(np.asarray(target, dtype=np.float32))

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        return nn.functional.cosine_similarity(output, self.target.to(output.device), dim=-1)


@dataclass
class Explanation:
    """Heatmaps for N (query, result) pairs, on the images the model saw (resized, cropped).

    Attributes:
        query_maps, result_maps: (N, H, W) float32 in [0, 1].
        query_images, result_images: the model's view of each image (PIL RGB, W x H).
        similarity: (N,) cosine similarity of each pair.
    """

    query_maps: np.ndarray
    result_maps: np.ndarray
    query_images: list[Image.Image]
    result_images: list[Image.Image]
    similarity: np.ndarray

    def overlays(self, image_weight: float = 0.5) -> list[tuple[Image.Image, Image.Image]]:
        """(query overlay, result overlay) per pair, as RGB images."""
        return [
            (overlay(q, qm, image_weight), overlay(r, rm, image_weight))
            for q, qm, r, rm in zip(
                self.query_images, self.query_maps, self.result_images, self.result_maps,
                strict=True,
            )
        ]  # fmt: skip


def overlay(image: Image.Image, heatmap: np.ndarray, image_weight: float = 0.5) -> Image.Image:
    """A heatmap in the JET colour map blended over the image it explains."""
    from pytorch_grad_cam.utils.image import show_cam_on_image

    rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return Image.fromarray(show_cam_on_image(rgb, heatmap, use_rgb=True, image_weight=image_weight))


def default_target_layer(model: nn.Module) -> nn.Module:
    """The last convolutional block: torchvision's ``features[-1]``, timm's ``bn2`` (after
    ``conv_head``), as the explained layer of MobileNet-style backbones."""
    if hasattr(model, "features") and isinstance(model.features, nn.Sequential):
        return model.features[-1]
    if hasattr(model, "bn2") and hasattr(model, "conv_head"):
        return model.bn2
    raise ExplainError(
        f"no default target layer for {type(model).__name__}; set explain.target_layer to the "
        "dotted name of a convolutional module (e.g. features.18)"
    )


def _without_inplace(model: nn.Module) -> nn.Module:
    model = copy.deepcopy(model).eval()
    for module in model.modules():
        if hasattr(module, "inplace"):
            module.inplace = False
    return model.float().to(memory_format=torch.contiguous_format)


class Explainer:
    """Grad-CAM, Grad-CAM++ or EigenCAM maps of query-result similarity.

    Args:
        embedder: its torch model and preprocessing are explained.
        method: one of METHODS. EigenCAM takes no target: its maps are the layer's first
            principal component, the same whichever result is paired with the query.
        target_layer: dotted module name inside the model; None takes `default_target_layer`.
    """

    def __init__(
        self, embedder: Embedder, method: str = "gradcam", target_layer: str | None = None
    ):
        from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus

        if method not in METHODS:
            raise ExplainError(
                f"explain.method must be one of {', '.join(METHODS)}, got {method!r}"
            )
        self.embedder, self.method = embedder, method
        self.model = _without_inplace(embedder.model)
        if target_layer:
            try:
                layer = self.model.get_submodule(target_layer)
            except AttributeError as err:
                raise ExplainError(
                    f"explain.target_layer={target_layer!r} is not a module of the model"
                ) from err
        else:
            layer = default_target_layer(self.model)
        cam = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "eigencam": EigenCAM}[method]
        self.cam = cam(model=self.model, target_layers=[layer])
        split = split_transform(embedder.transform)
        self._view = split[0] if split else None

    def view(self, image: Image.Image) -> Image.Image:
        """What the model sees of an image (resized and centre-cropped), for overlays."""
        if self._view is not None:
            return self._view(image)
        h, w = embedder_input_hw(self.embedder)
        return image.resize((w, h))

    def explain(
        self, queries: Sequence[Image.Image], results: Sequence[Image.Image]
    ) -> Explanation:
        """Heatmaps for each (queries[i], results[i]) pair, batched."""
        if len(queries) != len(results) or not queries:
            raise ValueError("explain needs as many queries as results, at least one")
        q = torch.stack([self.embedder.transform(im) for im in queries])
        r = torch.stack([self.embedder.transform(im) for im in results])
        with torch.no_grad():
            eq, er = self.model(q), self.model(r)
        similarity = nn.functional.cosine_similarity(eq, er, dim=1).numpy()
        targets_q = [CosineTarget(v) for v in er.numpy()]
        targets_r = [CosineTarget(v) for v in eq.numpy()]
        with torch.enable_grad():
            query_maps = self.cam(input_tensor=q, targets=targets_q)
            result_maps = self.cam(input_tensor=r, targets=targets_r)
        return Explanation(
            np.asarray(query_maps, dtype=np.float32),
            np.asarray(result_maps, dtype=np.float32),
            [self.view(im) for im in queries],
            [self.view(im) for im in results],
            similarity.astype(np.float32),
        )


def embedder_input_hw(embedder: Embedder) -> tuple[int, int]:
    shape = embedder.transform(Image.new("RGB", (256, 256))).shape
    return int(shape[1]), int(shape[2])
