"""The toy world: seeded scenes, their captions and masks, the toy tokenizer, the Perceiver-style pooler and
the attribute probe, each checked against geometry, the caption grammar or attention written out by hand."""

import math

import numpy as np
import PIL.Image
import pytest
import torch

from vilex.model import PoolerLayer, ViLexModel
from vilex.toyworld.components import toy_tokenizer
from vilex.toyworld.probe import AttributeProbe, _degrade, targets_of
from vilex.toyworld.scenes import (
    BACKGROUNDS, CELLS, COLOR_NAMES, COLORS, IMAGE_SIZE, SHAPES, SIZES, SPLITS, SceneObject, caption_vocabulary, make_scene,
    make_scenes, object_mask, partial_caption, detailed_caption, recolor_edit, recolored,
)

# The 3 x 3 grid of position words, written out here rather than read from the module.
GRID = (("top left", "top", "top right"), ("left", "center", "right"), ("bottom left", "bottom", "bottom right"))
BACKGROUND_WORDS = {"plain": "flat", "gradient": "gradient", "striped": "striped"}
# The tiny preset's vision encoder: 32 px images, 8 px patches -> 16 patch features.
TINY_VISION = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                   num_attention_heads=4, image_size=32, patch_size=8)


@pytest.fixture(scope="module")
def scenes():
    return make_scenes(200, SPLITS["test"])


def cell_from_geometry(x: float, y: float) -> str:
    """The cell of a centre: which third of the width and of the height it lies in."""
    third = IMAGE_SIZE / 3
    column = 0 if x < third else 1 if x < 2 * third else 2
    row = 0 if y < third else 1 if y < 2 * third else 2
    return GRID[row][column]


def parse_caption(caption: str) -> tuple[list[dict], str, str]:
    """'a large red circle at the top left and ... on a blue striped background' ->
    ([{size, color, shape, cell}, ...], background color, background kind)."""
    objects_part, _, background_part = caption.rpartition(" on ")
    article, background_color, background_word, last = background_part.split()
    assert article in ("a", "an") and last == "background", caption
    objects = []
    for phrase in objects_part.split(" and "):
        article, size, color, shape, *position = phrase.split()
        assert article == "a", caption
        if position == ["in", "the", "center"]:
            cell = "center"
        else:
            assert position[:2] == ["at", "the"], caption
            cell = " ".join(position[2:])
        objects.append(dict(size=size, color=color, shape=shape, cell=cell))
    return objects, background_color, BACKGROUND_WORDS[background_word]


# ---- scenes -------------------------------------------------------------------------------------------
def test_same_seed_same_scene_and_pixels_other_seed_different():
    a, b, c = make_scene(12345), make_scene(12345), make_scene(12346)
    assert a == b
    assert np.array_equal(np.asarray(a.render()), np.asarray(b.render()))
    assert a != c and not np.array_equal(np.asarray(a.render()), np.asarray(c.render()))


def test_splits_use_their_documented_seeds_and_never_overlap():
    # "scene i has seed split_seed * 10**7 + i"
    assert len(set(SPLITS.values())) == len(SPLITS)
    seeds = {}
    for name, split_seed in SPLITS.items():
        scenes = make_scenes(3, split_seed, start=1000)
        assert [s.seed for s in scenes] == [split_seed * 10**7 + 1000 + i for i in range(3)]
        seeds[name] = {s.seed for s in make_scenes(50, split_seed)}
    names = list(seeds)
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            assert not seeds[first] & seeds[second], (first, second)


def test_a_recolor_edit_changes_only_the_main_objects_color_and_its_word_turns_it_back(scenes):
    for scene in scenes[:12]:
        source, word = recolor_edit(scene)
        assert word == scene.main.color == parse_caption(scene.caption)[0][0]["color"]
        assert source.main.color not in (scene.main.color, scene.background_color)
        assert recolor_edit(scene) == (source, word)  # seeded by the scene
        # The caption differs in the color word only; the shade keeps its offset from the named color.
        assert source.caption == scene.caption.replace(f" {word} ", f" {source.main.color} ", 1)
        shade, new_shade = np.array(scene.main.rgb), np.array(source.main.rgb)
        unclipped = (new_shade > 0) & (new_shade < 255)
        assert np.array_equal((shade - COLORS[word])[unclipped], (new_shade - COLORS[source.main.color])[unclipped])
        assert recolored(source, word).objects[1:] == scene.objects[1:] and source.background_rgb == scene.background_rgb
        # In pixels: identical wherever the object does not reach; where it covers a pixel wholly, its new shade.
        coverage = object_mask(scene.main)
        before, after = np.asarray(scene.render(), np.int16), np.asarray(source.render(), np.int16)
        assert np.array_equal(before[coverage == 0], after[coverage == 0])
        assert (np.abs(after[coverage == 1] - np.array(source.main.rgb)) <= 1).all()
    assert len({recolor_edit(s)[0].main.color for s in scenes}) == len(COLOR_NAMES)
    with pytest.raises(ValueError, match="color must be one of red, green"):
        recolored(scenes[0], "teal")


def test_make_data_with_edits_writes_each_scene_with_its_recolor_edit_beside_it(tmp_path):
    from vilex.cli import main
    from vilex.training.data import find_images

    assert main(["toyworld", "make-data", str(tmp_path / "d"), "--n", "3", "--edits"]) == 0
    records = find_images(tmp_path / "d")
    assert [r.path.name for r in records] == ["000000.png", "000001.png", "000002.png"]
    for record, scene in zip(records, make_scenes(3, SPLITS["train"])):
        assert record.edit_path.name == record.path.stem + ".edit.png"
        word = record.edit_text_path.read_text().strip()
        assert word == parse_caption(record.caption_path.read_text())[0][0]["color"]
        target, before = (np.asarray(PIL.Image.open(p), np.int16) for p in (record.path, record.edit_path))
        assert np.array_equal(target, np.asarray(scene.render()))
        changed = (target != before).any(-1)
        assert changed.any() and not changed[object_mask(scene.main) == 0].any()  # only the main object


def test_make_data_with_partial_captions_writes_a_true_part_of_each_caption(tmp_path):
    """Each name.txt is one of the scene's 31 partial captions (checked against all of them), drawn from its seed
    (the same on a second run), with every part kept in some and left out in others; the images are unchanged."""
    import itertools

    from vilex.cli import main
    from vilex.toyworld.scenes import CAPTION_PARTS

    for name in ("a", "b"):
        assert main(["toyworld", "make-data", str(tmp_path / name), "--n", "40", "--partial-captions"]) == 0
    kept_sets = []
    for i, scene in enumerate(make_scenes(40, SPLITS["train"])):
        text = (tmp_path / "a" / f"{i:06d}.txt").read_text().strip()
        assert text == (tmp_path / "b" / f"{i:06d}.txt").read_text().strip()
        matches = [set(keep) for r in range(1, len(CAPTION_PARTS) + 1)
                   for keep in itertools.combinations(CAPTION_PARTS, r) if partial_caption(scene, keep) == text]
        assert matches, text
        kept_sets.append(matches[0])
        assert np.array_equal(np.asarray(PIL.Image.open(tmp_path / "a" / f"{i:06d}.png")), np.asarray(scene.render()))
    for part in CAPTION_PARTS:
        assert any(part in kept for kept in kept_sets) and any(part not in kept for kept in kept_sets), part


def test_main_object_is_largest_and_drawn_on_top(scenes):
    for scene in scenes:
        main, others = scene.objects[0], scene.objects[1:]
        assert all(main.radius > other.radius for other in others), scene.seed
        # Every shape covers its centre pixel fully at the main object's size (radius >= 11), so the rendered
        # pixel there is the main object's shade, whatever lies below it (1 level: rounding to uint8).
        pixel = np.asarray(scene.render(), dtype=np.int16)[int(main.y), int(main.x)]
        assert np.abs(pixel - np.array(main.rgb)).max() <= 1, scene.seed


def test_objects_are_inside_the_image_and_never_in_the_background_color(scenes):
    for scene in scenes:
        assert 1 <= len(scene.objects) <= 3
        for obj in scene.objects:
            assert obj.color != scene.background_color, scene.seed
            assert 0 <= obj.x - obj.radius and obj.x + obj.radius <= IMAGE_SIZE, scene.seed
            assert 0 <= obj.y - obj.radius and obj.y + obj.radius <= IMAGE_SIZE, scene.seed


def test_the_world_draws_one_object_on_a_flat_or_gradient_background_with_every_class(scenes):
    """The simplified world (issue 17): one object, flat or gradient backgrounds; every shape, color, cell and
    size still occurs, so every attribute the probe reads still varies."""
    assert {len(s.objects) for s in scenes} == {1}
    assert {s.background for s in scenes} == {"flat", "gradient"}
    assert {s.main.shape for s in scenes} == set(SHAPES) and {s.main.color for s in scenes} == set(COLOR_NAMES)
    assert {s.main.cell for s in scenes} == set(CELLS) and {s.main.size for s in scenes} == set(SIZES)


def test_caption_names_each_object_and_the_background(scenes):
    vocabulary = set(caption_vocabulary())
    for scene in scenes:
        caption = scene.caption
        assert set(caption.split()) <= vocabulary, caption
        objects, background_color, background = parse_caption(caption)
        assert (background_color, background) == (scene.background_color, scene.background), caption
        assert len(objects) == len(scene.objects), caption
        for said, obj in zip(objects, scene.objects):  # the main object is named first
            assert said["shape"] == obj.shape and said["color"] == obj.color, caption
            assert said["size"] == ("large" if obj.radius >= 14.0 else "small"), caption
            assert said["cell"] == cell_from_geometry(obj.x, obj.y), caption


def test_partial_captions_keep_the_asked_parts_in_the_captions_order(scenes):
    """Every part kept: the whole caption; fewer: a subsequence of its words (articles apart: "an orange square"
    without the size) that holds the kept parts' words (read with this file's caption parser) and no dropped
    shape or size word; asking for nothing is refused."""
    import itertools

    parts = ("size", "color", "shape", "cell", "background")
    for scene in scenes[:40]:
        assert partial_caption(scene, parts) == scene.caption
        (own,), background_color, background = parse_caption(scene.caption)
        expected = {"size": own["size"], "color": own["color"], "shape": own["shape"], "cell": own["cell"],
                    "background": f"{background_color} {dict(map(reversed, BACKGROUND_WORDS.items()))[background]}"}
        for keep in itertools.chain.from_iterable(itertools.combinations(parts, n) for n in (1, 2, 3)):
            words = partial_caption(scene, keep).split()
            full = iter(w for w in scene.caption.split() if w not in ("a", "an"))
            assert all(w in full for w in words if w not in ("a", "an")), (keep, words)  # a subsequence, in order
            for part in keep:
                assert f" {expected[part]} " in f" {' '.join(words)} ", (part, words)
            for part in {"shape", "size"} - set(keep):
                assert expected[part] not in words, (part, words)
        assert partial_caption(scene, ["color"]) == own["color"]
    with pytest.raises(ValueError, match="non-empty subset"):
        partial_caption(scenes[0], [])
    with pytest.raises(ValueError, match="non-empty subset"):
        partial_caption(scenes[0], ["shade"])


def test_detailed_caption_is_the_centre_to_a_tenth_and_the_radius_to_a_pixel_then_the_caption(scenes):
    """`train-base --detailed-captions`: "x X y Y r R", then the coarse caption, read back here: the centre lies in
    the X-th and Y-th tenth of the image, the radius in [11 + R, 12 + R) px (the world's 11-17 px); each detail
    word is one token of the toy tokenizer."""
    tokenizer = toy_tokenizer()
    seen = set()
    for scene in scenes:
        caption = detailed_caption(scene)
        assert caption.endswith(" " + scene.caption)
        x_word, x, y_word, y, r_word, r = caption[:-len(scene.caption) - 1].split()
        assert (x_word, y_word, r_word) == ("x", "y", "r")
        main = scene.main
        assert int(x) * 6.4 <= main.x < (int(x) + 1) * 6.4 and int(y) * 6.4 <= main.y < (int(y) + 1) * 6.4
        assert 11 + int(r) <= main.radius < 12 + int(r)
        seen |= {("x", x), ("y", y), ("r", r)}
        ids = tokenizer(caption, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(caption.split()), caption
    assert {v for k, v in seen if k == "r"} == set("012345") and len({v for k, v in seen if k == "x"}) >= 6


def test_detailed_caption_with_two_digits_names_the_centre_to_a_hundredth(scenes):
    """`--detail-digits 2`: "x A B y C D r R": the centre lies in the AB-th and CD-th hundredth of the image (0.64 px
    bins), the first digit the same tenth as with one digit; every digit one token."""
    tokenizer = toy_tokenizer()
    for scene in scenes:
        caption = detailed_caption(scene, digits=2)
        assert caption.endswith(" " + scene.caption)
        x_word, x1, x2, y_word, y1, y2, r_word, r = caption[:-len(scene.caption) - 1].split()
        assert (x_word, y_word, r_word) == ("x", "y", "r")
        x, y, main = int(x1 + x2), int(y1 + y2), scene.main
        assert x * 0.64 <= main.x < (x + 1) * 0.64 and y * 0.64 <= main.y < (y + 1) * 0.64
        assert detailed_caption(scene).split()[1] == x1 and detailed_caption(scene).split()[3] == y1
        assert 11 + int(r) <= main.radius < 12 + int(r)
        assert len(tokenizer(caption, add_special_tokens=False)["input_ids"]) == len(caption.split())
    with pytest.raises(ValueError, match="digits must be one of"):
        detailed_caption(scenes[0], digits=3)


def test_swapped_captions_change_exactly_one_word_to_every_other_value(scenes):
    """The vision pretraining's hard negatives, read back with this file's own caption parser."""
    from vilex.toyworld.vision_pretrain import swapped_captions

    allowed = {"shape": SHAPES, "color": COLOR_NAMES, "size": SIZES, "cell": sum(GRID, ()),
               "background_color": COLOR_NAMES}
    swapped, slices = swapped_captions(scenes[:20])
    for scene, captions in zip(scenes, swapped):
        (own,), background_color, _ = parse_caption(scene.caption)
        own = own | {"background_color": background_color}
        for word, part in slices.items():
            seen = []
            for caption in captions[part]:
                (said,), background_color, _ = parse_caption(caption)
                said = said | {"background_color": background_color}
                assert {k for k in own if said[k] != own[k]} == {word}, (scene.caption, caption)
                seen.append(said[word])
            assert sorted(seen) == sorted(set(allowed[word]) - {own[word]}), (word, seen)


def test_captioning_targets_are_each_captions_tokens_after_bos(scenes):
    """The vision pretraining's captioning targets: per caption its words, then EOS, as the tokenizer reads them;
    BOS and padding are ignored (-100)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from vilex.toyworld.vision_pretrain import _caption_states

    tokenizer = toy_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                                num_hidden_layers=1, num_attention_heads=2)).eval()
    captions = [s.caption for s in scenes[:30]]
    states, rows, targets = _caption_states(tokenizer, text_encoder, captions)
    assert states.shape[:2] == targets.shape
    for caption, row in zip(captions, rows.tolist()):
        kept = [i for i in targets[row].tolist() if i != -100]
        assert targets[row, 0] == -100 and kept[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(kept, skip_special_tokens=True).split() == caption.split(), caption


def test_caption_of_refuses_a_word_it_cannot_swap(scenes):
    from vilex.toyworld.scenes import caption_of

    with pytest.raises(ValueError, match="shape=.hexagon.*swappable: shape in circle"):
        caption_of(scenes[0], shape="hexagon")
    with pytest.raises(ValueError, match="texture"):
        caption_of(scenes[0], texture="flat")


@pytest.mark.parametrize("shape, area_over_r2", [
    ("circle", math.pi),
    ("square", 1.7**2),  # half-side 0.85 r
    ("diamond", 2.0),  # diagonals 2r
])
def test_mask_area_matches_the_shape_formula(shape, area_over_r2):
    # r = 12 px at the centre. Tolerance 3%: PIL fills the boundary pixels of the 4x supersampled drawing,
    # which grows the shape by about 1/8 px (2% of the area at r = 12).
    r = 12.0
    mask = object_mask(SceneObject(shape=shape, color="red", rgb=(210, 40, 40), x=32.0, y=32.0, radius=r))
    assert mask.min() >= 0.0 and mask.max() <= 1.0
    assert mask.sum() == pytest.approx(area_over_r2 * r * r, rel=0.03)
    # The mask is centred on (x, y) (pixel i spans i..i+1) to within 0.2 px: PIL reads coordinates as pixel
    # indices and fills the end pixel, which moves circles and diamonds by 1/8 px (half a supersampled pixel).
    rows, columns = np.indices(mask.shape) + 0.5
    assert (columns * mask).sum() / mask.sum() == pytest.approx(32.0, abs=0.2)
    assert (rows * mask).sum() / mask.sum() == pytest.approx(32.0, abs=0.2)


# ---- the toy tokenizer --------------------------------------------------------------------------------
def test_every_caption_word_is_one_token():
    tokenizer = toy_tokenizer()
    split = {word: ids for word in caption_vocabulary()
             if len(ids := tokenizer(word, add_special_tokens=False)["input_ids"]) != 1}
    assert not split, {word: tokenizer.convert_ids_to_tokens(ids) for word, ids in split.items()}


def test_a_caption_has_as_many_tokens_as_words(scenes):
    tokenizer = toy_tokenizer()
    for scene in scenes[:20]:
        ids = tokenizer(scene.caption, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(scene.caption.split()), scene.caption


# ---- the Perceiver-style pooler -----------------------------------------------------------------------
def small_vilex(pooler_self_attention: bool) -> ViLexModel:
    torch.manual_seed(0)
    return ViLexModel(vision_config=TINY_VISION, num_queries=4, pooler_depth=2, pooler_heads=4, pooler_width=32,
                      output_dim=32, token_scale=0.02, pooler_self_attention=pooler_self_attention).eval()


def pixels(batch=2):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_self_attention_layer_equals_attention_over_features_and_queries():
    # Flamingo's Perceiver resampler: attn(q = Wq LN(queries), kv = W [LN(features); LN(queries)]), written out
    # with an explicit softmax.
    torch.manual_seed(0)
    layer = PoolerLayer(width=32, heads=4, self_attention=True).eval()
    queries, features = torch.randn(2, 3, 32), torch.randn(2, 5, 32)  # (B, N, W), (B, P, W)
    with torch.no_grad():
        normed = layer.norm_q(queries)
        context = torch.cat([layer.norm_kv(features), normed], dim=1)  # (B, P + N, W)
        q = layer.to_q(normed).unflatten(-1, (4, 8)).transpose(1, 2)  # (B, h, N, 8)
        k, v = (t.unflatten(-1, (4, 8)).transpose(1, 2) for t in layer.to_kv(context).chunk(2, dim=-1))  # (B, h, P+N, 8)
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1)  # (B, h, N, P + N)
        attended = layer.to_out((weights @ v).transpose(1, 2).flatten(2))  # (B, N, W)
        expected = queries + attended
        expected = expected + layer.mlp(layer.norm_mlp(expected))
        torch.testing.assert_close(layer(queries, features), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("self_attention", [False, True])
def test_first_token_depends_on_other_queries_only_with_self_attention(self_attention):
    model = small_vilex(self_attention)
    with torch.no_grad():
        before = model(pixels()).vilex_tokens
        # Move only query 1, by a random vector (a constant shift would vanish in the LayerNorms).
        model.pooler.queries[1] += torch.randn(32, generator=torch.Generator().manual_seed(1))
        after = model(pixels()).vilex_tokens
    assert before.shape == (2, 4, 32)
    assert (after[:, 1] - before[:, 1]).abs().max() > 1e-3  # the moved query's own token changes
    change_of_token_0 = (after[:, 0] - before[:, 0]).abs().max().item()
    if self_attention:
        assert change_of_token_0 > 1e-4  # query 0 attends to query 1
    else:
        assert change_of_token_0 < 1e-6  # queries only see the patch features


def test_self_attention_flag_survives_save_and_load(tmp_path):
    model = small_vilex(True)
    model.save_pretrained(tmp_path, safe_serialization=True)
    reloaded = ViLexModel.from_pretrained(tmp_path, use_safetensors=True, low_cpu_mem_usage=False).eval()
    assert reloaded.config.pooler_self_attention is True
    assert all(layer.self_attention for layer in reloaded.pooler.layers)
    with torch.no_grad():
        assert torch.equal(model(pixels()).vilex_tokens, reloaded(pixels()).vilex_tokens)


# ---- the attribute probe ------------------------------------------------------------------------------
def test_probe_gives_logits_per_class_and_a_centre():
    probe = AttributeProbe().eval()
    images = torch.rand(3, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = probe(images)
    # shape 5, color 8, cell 9, size 2, background 3, background color 8; the centre is (x, y)
    expected = {"shape": 5, "color": 8, "cell": 9, "size": 2, "background": 3, "background_color": 8, "center": 2}
    assert {name: tuple(value.shape) for name, value in out.items()} == {n: (3, c) for n, c in expected.items()}


def test_targets_are_the_main_objects_attributes(scenes):
    targets = targets_of(scenes[:30])
    for i, scene in enumerate(scenes[:30]):
        main = scene.objects[0]
        assert SHAPES[targets["shape"][i]] == main.shape and COLOR_NAMES[targets["color"][i]] == main.color
        assert CELLS[targets["cell"][i]] == cell_from_geometry(main.x, main.y)
        assert SIZES[targets["size"][i]] == ("large" if main.radius >= 14.0 else "small")
        assert BACKGROUNDS[targets["background"][i]] == scene.background
        assert COLOR_NAMES[targets["background_color"][i]] == scene.background_color
        assert targets["center"][i].tolist() == pytest.approx([main.x, main.y])


def test_degrade_keeps_a_flat_image_flat_and_is_seeded():
    # A normalised blur leaves a constant image unchanged; the noise is at most 0.04 std.
    flat = torch.full((4, 3, IMAGE_SIZE, IMAGE_SIZE), 0.5)
    degraded = _degrade(flat, torch.Generator().manual_seed(0))
    assert degraded.shape == flat.shape and degraded.min() >= 0 and degraded.max() <= 1
    assert degraded.mean().item() == pytest.approx(0.5, abs=0.005)
    assert degraded.std().item() < 0.045
    assert torch.equal(degraded, _degrade(flat, torch.Generator().manual_seed(0)))


def test_common_words_stay_single_tokens_when_later_words_add_merges():
    # Regression: a later word's merges used to be chained without regard to the earlier words' merges, and
    # BPE then split words like "background" into pieces. Every word of both lists is one token.
    from vilex.tokenizer import COMMON_WORDS, build_clip_tokenizer

    tokenizer = build_clip_tokenizer(words=list(COMMON_WORDS) + ["grand", "ground", "background"])
    for word in list(COMMON_WORDS) + ["grand", "ground", "background"]:
        assert len(tokenizer(word, add_special_tokens=False)["input_ids"]) == 1, word


def test_linear_probe_reads_a_linearly_coded_class_and_not_noise():
    """`linear_probe`'s shape read, on features built here: a class written into the features linearly is read
    back on held-out rows; features that carry nothing give about the most common class's accuracy."""
    from vilex.toyworld.linear_probe import CHECK, FIT, ridge_accuracy

    rng = np.random.default_rng(0)
    classes = rng.integers(5, size=FIT + CHECK)
    noise = rng.normal(size=(FIT + CHECK, 16))
    coded = noise + 5 * np.eye(5, 16)[classes]
    accuracy, baseline = ridge_accuracy(coded, classes, 5)
    assert accuracy > 0.95 and abs(baseline - 0.2) < 0.05, (accuracy, baseline)
    accuracy, _ = ridge_accuracy(noise, classes, 5)
    assert accuracy < 0.3, accuracy
