"""The e4e encoder, the `e4e` transform (truncation and project modes) and the `seeds` source, on tiny models."""

import numpy as np
import pytest
import torch

from facegen import registry
from facegen.errors import UsageError
from facegen.generators.e4e import Encoder4Editing, encoder_config
from facegen.generators.stylegan_checkpoints import load_e4e
from facegen.plugins.e4e import E4ETransform, arcface_box, arcface_to_ffhq, ffhq_to_arcface, resize
from facegen.plugins.seeds import SeedsSource
from facegen.records import Identity, SourceImage
from facegen.testing.folder import draw_face, encode
from facegen.testing.stylegan import TINY_ENCODER_WIDTHS, write_stylegan2_checkpoint


@pytest.fixture(scope="module")
def checkpoints(stylegan_checkpoints):
    return stylegan_checkpoints


@pytest.fixture(scope="module")
def models(checkpoints):
    return load_e4e(str(checkpoints[0]))


def make_transform(checkpoints, **options):
    transform = E4ETransform(checkpoint=str(checkpoints[0]), **options)
    transform.setup("cpu")
    return transform


def seeds(*values):
    return [Identity(id=str(i), cls=i, seed=s) for i, s in enumerate(values)]


def faces(results):
    return [face for result in results for face in result.faces]


# ---- encoder ---------------------------------------------------------------------------------------------------

def test_encoder_predicts_one_base_code_plus_per_layer_deltas():
    torch.manual_seed(0)
    encoder = Encoder4Editing(64, style_dim=32, widths=TINY_ENCODER_WIDTHS).eval()
    assert encoder.n_latent == 10
    assert encoder_config(encoder.state_dict()) == {"stylegan_size": 64, "style_dim": 32,
                                                    "widths": TINY_ENCODER_WIDTHS}
    x = torch.rand(2, 3, 256, 256) * 2 - 1
    with torch.no_grad():
        codes = encoder(x)
        assert codes.shape == (2, 10, 32)
        assert not torch.allclose(codes[:, 1], codes[:, 0])
        # with the delta blocks silenced every layer carries the base code of block 0
        for block in encoder.styles[1:]:
            block.linear.weight.zero_()
            block.linear.bias.zero_()
        silenced = encoder(x)
    torch.testing.assert_close(silenced, silenced[:, :1].expand(-1, 10, -1))
    torch.testing.assert_close(silenced[:, 0], codes[:, 0])


def test_encoder_rows_are_independent_of_the_batch(models):
    x = torch.rand(3, 3, 256, 256) * 2 - 1
    with torch.no_grad():
        together = models.encode(x)
        alone = torch.cat([models.encode(x[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)


# ---- framing ---------------------------------------------------------------------------------------------------

def test_arcface_box_follows_the_ffhq_rule():
    left, top, side = arcface_box()
    assert (round(left, 3), round(top, 3), round(side, 3)) == (0.118, 0.12, 0.765)
    frame = torch.zeros(1, 3, 256, 256)
    frame[:, :, 31:31 + 196, 30:30 + 196] = 1.0  # the box at 256: left 30, top 31, side 196
    crop = ffhq_to_arcface(frame)
    assert crop.shape == (1, 3, 112, 112)
    torch.testing.assert_close(crop, torch.ones_like(crop))
    # ArcFace crops placed back: the crop fills the box, the border repeats its edge
    crops = torch.linspace(-1, 1, 112).view(1, 1, 1, 112).expand(1, 3, 112, 112)
    placed = arcface_to_ffhq(crops, 256)
    assert placed.shape == (1, 3, 256, 256)
    torch.testing.assert_close(placed[:, :, 31:227, 30:226], resize(crops, 196))
    assert torch.all(placed[:, :, :, :30] == placed[:, :, :, 30:31])


# ---- truncation mode ---------------------------------------------------------------------------------------------

def test_truncation_follows_the_sfhq_recipe(checkpoints, models):
    """phi = 1 renders the psi-truncated sample itself, phi = 0 its e4e reconstruction, 0.5 the code halfway."""
    g = models.generator
    identity_seed = 1234
    z = torch.randn(1, g.style_dim, generator=torch.Generator().manual_seed(identity_seed))
    with torch.no_grad():
        w_hi = g.broadcast(g.truncate(g.mapping(z), 1.7))
        w_e4e = models.encode(resize(g.synthesis(w_hi), 256))
        expected = {phi: g.synthesis(w_e4e + phi * (w_hi - w_e4e)) for phi in (0.0, 0.5, 1.0)}
    for phi, image in expected.items():
        transform = make_transform(checkpoints, mode="truncation", psi="1.7", phi=str(phi))
        (face,) = faces(transform(seeds(identity_seed)))
        pixels = ((image.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[0].permute(1, 2, 0).numpy()
        assert face.image.shape == (32, 32, 3) and face.image.dtype == np.uint8
        assert np.abs(face.image.astype(int) - pixels.astype(int)).max() <= 1
        assert face.meta == {"mode": "truncation", "seed": identity_seed, "candidate": 0, "psi": 1.7, "phi": phi,
                             "perturbation": 0.0, "noise": "const"}
    assert not torch.allclose(expected[0.0], expected[1.0])


def test_batched_equals_one_at_a_time_and_seeds_decide(checkpoints):
    batched = make_transform(checkpoints, candidates=2, noise="random", batch_size=4)
    single = make_transform(checkpoints, candidates=2, noise="random", batch_size=1)
    identities = seeds(11, 22, 33)
    together = list(batched(identities))
    alone = [r for identity in identities for r in single([identity])]
    assert [r.identity.id for r in together] == ["0", "1", "2"]
    for a, b in zip(faces(together), faces(alone)):
        assert np.abs(a.image.astype(int) - b.image.astype(int)).max() <= 1
        assert a.meta == b.meta and a.ref == b.ref
    again = faces(batched(seeds(11)))
    assert all(np.array_equal(a.image, b.image) for a, b in zip(again, faces(together)[:2]))
    other = faces(batched(seeds(12)))
    assert not np.array_equal(other[0].image, again[0].image)


def test_candidates_differ_by_perturbation_and_noise(checkpoints):
    perturbed = faces(make_transform(checkpoints, candidates=3, perturbation=0.5)(seeds(5)))
    assert [f.meta["candidate"] for f in perturbed] == [0, 1, 2]
    assert [f.meta["perturbation"] for f in perturbed] == [0.0, 0.5, 0.5]
    assert not np.array_equal(perturbed[0].image, perturbed[1].image)
    assert not np.array_equal(perturbed[1].image, perturbed[2].image)
    # candidate 0 is the unperturbed code: the same as a single-candidate run
    (single,) = faces(make_transform(checkpoints)(seeds(5)))
    assert np.array_equal(single.image, perturbed[0].image)
    noisy = faces(make_transform(checkpoints, candidates=2, perturbation=0, noise="random")(seeds(5)))
    assert [f.meta["noise"] for f in noisy] == ["random", "random"]
    assert not np.array_equal(noisy[0].image, noisy[1].image)
    assert not np.array_equal(noisy[0].image, single.image)


def test_output_size_and_arcface_alignment(checkpoints):
    (big,) = faces(make_transform(checkpoints, size=48)(seeds(3)))
    assert big.image.shape == (48, 48, 3)
    (aligned,) = faces(make_transform(checkpoints, align="arcface")(seeds(3)))
    assert aligned.image.shape == (112, 112, 3)


def test_separate_generator_checkpoint_is_used(tmp_path, checkpoints):
    other = write_stylegan2_checkpoint(tmp_path / "other.pt", size=32, seed=5)
    (own,) = faces(make_transform(checkpoints)(seeds(3)))
    transform = make_transform(checkpoints, generator_checkpoint=str(other))
    (swapped,) = faces(transform(seeds(3)))
    assert not np.array_equal(own.image, swapped.image)
    models = {m.role.split(" ")[0]: m for m in transform.models()}
    assert models["StyleGAN2"].source == str(other.resolve())
    assert "NVIDIA Source Code License-NC" == models["StyleGAN2"].license
    mismatch = write_stylegan2_checkpoint(tmp_path / "g64.pt", size=64)
    with pytest.raises(UsageError, match="does not match the e4e encoder"):
        make_transform(checkpoints, generator_checkpoint=str(mismatch))


# ---- project mode ----------------------------------------------------------------------------------------------

def source_images(identity_index, count, size=112, corrupt=()):
    images = []
    for n in range(count):
        data = encode(draw_face(identity_index, n, size=size), "png")
        if n in corrupt:
            data = data[: len(data) // 3]
        images.append(SourceImage(ref=f"{identity_index}/{n}.png", data=data, ext="png", meta={"image_index": n},
                                  extras={"note.txt": b"x"}))
    return images


def test_project_mode_encodes_each_source_image(checkpoints):
    transform = make_transform(checkpoints, mode="project", candidates=2, input_framing="arcface")
    batch = [Identity("a", 0, 7, images=source_images(0, 3, corrupt=(1,))),
             Identity("b", 1, 8, images=source_images(1, 1)),
             Identity("c", 2, 9)]
    results = list(transform(batch))
    assert [len(r.faces) for r in results] == [4, 2, 0]
    assert [f.ref for f in results[0].faces] == ["0/0.png", "0/0.png", "0/2.png", "0/2.png"]
    assert results[0].faces[2].meta == {"image_index": 2, "mode": "project", "seed": 7, "candidate": 0,
                                        "perturbation": 0.0, "noise": "const"}  # no psi/phi: never null
    # the source's extras describe the source image, not the re-rendered face: not carried over
    assert results[0].faces[0].extras == {} and transform.extra_features(None) == {}
    assert [(s.ref, s.reason) for s in results[0].skipped] == [("0/1.png", "corrupt image")]
    assert [(s.ref, s.reason) for s in results[2].skipped] == [("c", "no source image")]
    # different source images give different faces; the same image in a smaller batch gives the same face
    assert not np.array_equal(results[0].faces[0].image, results[0].faces[2].image)
    (again,) = [r for r in transform([Identity("b", 1, 8, images=source_images(1, 1))])]
    assert all(np.abs(a.image.astype(int) - b.image.astype(int)).max() <= 1
               for a, b in zip(again.faces, results[1].faces))


def test_json_features_cover_every_meta_field(checkpoints, tmp_path):
    from facegen.plugins.folder import FolderSource
    from facegen.testing.folder import write_folder_source

    folder = FolderSource(write_folder_source(tmp_path / "src", identities=1, images_per_identity=1))
    transform = make_transform(checkpoints, mode="project")
    (face,) = faces(transform([Identity("0", 0, 1, images=folder.load("0"))]))
    assert set(transform.json_features(folder)) == set(face.meta)
    truncation = make_transform(checkpoints)
    (face,) = faces(truncation(seeds(1)))
    assert set(truncation.json_features(SeedsSource("-", count=1))) == set(face.meta)


# ---- options and errors ----------------------------------------------------------------------------------------

def test_user_mistakes_are_one_line_usage_errors(tmp_path, checkpoints):
    with pytest.raises(UsageError, match="checkpoint is required"):
        E4ETransform()
    with pytest.raises(UsageError, match="would all be identical"):
        E4ETransform(checkpoint="x.pt", candidates=3, perturbation=0)
    with pytest.raises(UsageError, match="must be one of"):
        E4ETransform(checkpoint="x.pt", mode="invert")
    with pytest.raises(UsageError, match="bad value"):
        E4ETransform(checkpoint="x.pt", psi="high")
    with pytest.raises(UsageError, match="nothere.pt not found") as info:  # before the run writes anything
        E4ETransform(checkpoint=str(tmp_path / "nothere.pt"))
    assert "\n" not in str(info.value)
    with pytest.raises(UsageError, match="generator_checkpoint .* is a directory"):
        E4ETransform(checkpoint=str(checkpoints[0]), generator_checkpoint=str(tmp_path))
    E4ETransform(checkpoint="someone/e4e-mirror/e4e_ffhq_encode.pt@main")  # Hub files are fetched in setup()
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(UsageError, match="not a readable PyTorch checkpoint"):
        E4ETransform(checkpoint=str(tmp_path / "junk.pt")).setup("cpu")


def test_card_metadata_names_the_licences_and_papers(checkpoints):
    transform = make_transform(checkpoints)
    assert transform.license.commercial_use is False
    assert "nvlabs.github.io/stylegan2/license.html" in transform.license.link
    for key in ("karras2020analyzing", "tov2021designing", "david_beniaguev_2022_SFHQ"):
        assert key in transform.citation
    roles = [m.role for m in transform.models()]
    assert roles[0].startswith("e4e encoder") and roles[1].startswith("StyleGAN2")
    assert transform.models()[0].license.startswith("MIT")
    assert transform.provenance()["generator_size"] == 32


# ---- seeds source ----------------------------------------------------------------------------------------------

def test_seeds_source_lists_numbers_and_reads_nothing(tmp_path):
    assert registry.get_source("seeds") is SeedsSource
    assert registry.get_transform("e4e") is E4ETransform
    source = SeedsSource("-", count="4", start="10")
    assert source.identities() == ["10", "11", "12", "13"]
    assert source.load("11") == []
    assert SeedsSource(str(tmp_path / "does-not-exist"), count=1).identities() == ["0"]
    assert SeedsSource(None).identities()[:3] == ["0", "1", "2"] and len(SeedsSource(None).identities()) == 1000
    with pytest.raises(UsageError, match="count must be at least 1"):
        SeedsSource("-", count=0)
    with pytest.raises(UsageError, match="bad value"):
        SeedsSource("-", count="many")
