"""Image augmentation for pre-training, on already-normalised pixel tensors (cheap, seeded, resumable).

Few images per entity (a flag seen in a handful of renderings) make a vision tower memorise pixels; small random
translations and brightness/contrast jitter make it learn the design instead. The generator is seeded per
micro-batch, so a resumed run augments exactly as the uninterrupted one did.
"""

import torch
import torch.nn.functional as F


def augment_pixel_values(
    pixel_values: torch.Tensor, seed: int, max_shift: float = 0.1, jitter: float = 0.2
) -> torch.Tensor:
    """Randomly translate each image by up to `max_shift` of its side (reflection padding) and jitter its
    brightness and contrast by up to `jitter`. `pixel_values`: `(batch, channels, height, width)`, values in the
    processor's normalised range; returns a tensor of the same shape."""
    if pixel_values.dim() != 4:
        raise ValueError(f"pixel_values must have shape (batch, channels, height, width), got {tuple(pixel_values.shape)}")
    generator = torch.Generator().manual_seed(seed)
    batch_size, _, height, width = pixel_values.shape
    pad = max(1, round(max_shift * min(height, width)))
    padded = F.pad(pixel_values, (pad, pad, pad, pad), mode="reflect")
    offsets = torch.randint(0, 2 * pad + 1, (batch_size, 2), generator=generator)
    shifted = torch.stack(
        [padded[index, :, dy : dy + height, dx : dx + width] for index, (dy, dx) in enumerate(offsets.tolist())]
    )
    contrast = 1.0 + jitter * (torch.rand(batch_size, 1, 1, 1, generator=generator) - 0.5)
    brightness = jitter * (torch.rand(batch_size, 1, 1, 1, generator=generator) - 0.5)
    low, high = pixel_values.min().item(), pixel_values.max().item()
    return (shifted * contrast + brightness).clamp(low, high)
