"""README's one-step switch from a torchvision-transform script to the fast path: drop the
transform, name the device; the model then runs on the batches as they arrive."""
import pytest
import torch
from torch import nn

from imagenet_seq.data import IMAGENET_MEAN, IMAGENET_STD, ImagenetLoader


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 4))


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu")])
def test_transform_none_with_device_feeds_the_model(sample_lmdb, device):
    model = _model()
    for split in ("train", "val"):
        loader = ImagenetLoader(sample_lmdb, split, transform=None, device=device,
                                batch_size=8, num_workers=1, image_size=32, resize_size=40)
        images, target = next(iter(loader))
        loader.close()
        assert images.dtype == torch.float32 and images.shape == (8, 3, 32, 32)
        assert target.dtype == torch.int64 and images.device.type == "cpu"
        assert model(images).shape == (8, 4)  # no Byte/Float mismatch


def test_the_normalisation_is_imagenet_mean_std(sample_lmdb):
    kw = dict(batch_size=4, num_workers=0, image_size=32, resize_size=40)
    raw, _ = next(iter(ImagenetLoader(sample_lmdb, "val", **kw)))
    fast, _ = next(iter(ImagenetLoader(sample_lmdb, "val", device="cpu", **kw)))
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    assert raw.dtype == torch.uint8
    assert torch.allclose(fast, (raw.float() / 255 - mean) / std, atol=1e-5)


def test_uint8_batches_fail_in_the_first_layer_as_readme_says(sample_lmdb):
    """What a user meets when the transform is dropped without device=: README names it."""
    loader = ImagenetLoader(sample_lmdb, "val", batch_size=4, num_workers=0, image_size=32,
                            resize_size=40)
    images, _ = next(iter(loader))
    with pytest.raises(RuntimeError, match="Byte|unsigned char"):
        _model()(images)
