"""Every transformer class the installed diffusers exports is either run by the suite (a tiny config in
tests/tiny_models.py, compared with eager on several meshes) or listed here with what is known of it. A
diffusers upgrade that adds a class fails this test until the class is given a tiny config or an entry."""
from __future__ import annotations

import diffusers
import pytest

from tests.tiny_models import CASES

# class -> the tiny_models cases that run it
TESTED = {
    "FluxTransformer2DModel": ["flux"],
    "SD3Transformer2DModel": ["sd3"],
    "WanTransformer3DModel": ["wan_t2v", "wan_i2v"],
    "HunyuanVideoTransformer3DModel": ["hunyuan_video"],
    "CogVideoXTransformer3DModel": ["cogvideox"],
    "MochiTransformer3DModel": ["mochi"],
    "LTXVideoTransformer3DModel": ["ltx_video"],
    "QwenImageTransformer2DModel": ["qwen_image"],
    "PixArtTransformer2DModel": ["pixart"],
    "HiDreamImageTransformer2DModel": ["hidream"],
    "Lumina2Transformer2DModel": ["lumina2"],
    "SanaTransformer2DModel": ["sana"],
    "SanaVideoTransformer3DModel": ["sana_video"],
    "Flux2Transformer2DModel": ["flux2"],
    "ConsisIDTransformer3DModel": ["consisid"],
    "LatteTransformer3DModel": ["latte"],
    "HunyuanImageTransformer2DModel": ["hunyuan_image"],
    "ChromaTransformer2DModel": ["chroma"],
    "CogView4Transformer2DModel": ["cogview4"],
    "CogView3PlusTransformer2DModel": ["cogview3plus"],
    "AuraFlowTransformer2DModel": ["auraflow"],
    "AllegroTransformer3DModel": ["allegro"],
    "CosmosTransformer3DModel": ["cosmos"],
    "SkyReelsV2Transformer3DModel": ["skyreels_v2"],
    "WanVACETransformer3DModel": ["wan_vace"],
    "HunyuanVideo15Transformer3DModel": ["hunyuan_video15"],
    "ZImageTransformer2DModel": ["z_image"],
    "DiTTransformer2DModel": ["dit"],
    "EasyAnimateTransformer3DModel": ["easyanimate"],
    "BriaTransformer2DModel": ["bria"],
    "LongCatImageTransformer2DModel": ["longcat_image"],
    "OvisImageTransformer2DModel": ["ovis_image"],
    "ChronoEditTransformer3DModel": ["chronoedit"],
    "Kandinsky5Transformer3DModel": ["kandinsky5"],
    "OmniGenTransformer2DModel": ["omnigen"],
    "HunyuanVideoFramepackTransformer3DModel": ["framepack"],
    "LTX2VideoTransformer3DModel": ["ltx2"],
    "Krea2Transformer2DModel": ["krea2"],
    "ErnieImageTransformer2DModel": ["ernie_image"],
    "PRXTransformer2DModel": ["prx"],
    "Flux3Transformer2DModel": ["flux3"],
    "BriaFiboTransformer2DModel": ["bria_fibo"],
}

NO_TINY_CONFIG_YET = "no tiny config in the suite yet (issue 14)"

# class -> why the suite does not run it (yet), with what is known
NOT_IN_SUITE = {
    "Transformer2DModel": "the generic transformer block stack (PixArt's predecessor, UNet attention); "
                          + NO_TINY_CONFIG_YET,
    "TransformerTemporalModel": "a temporal attention stack used inside video UNets, not a DiT entry point; "
                                + NO_TINY_CONFIG_YET,
    "AceStepTransformer1DModel": "an audio transformer over one sequence axis; " + NO_TINY_CONFIG_YET,
    "MiniMaxMusic3Transformer1DModel": "an audio transformer over one sequence axis; " + NO_TINY_CONFIG_YET,
}
NOT_IN_SUITE.update({
    "GlmImageTransformer2DModel": "its pipeline calls it first to fill a key/value cache of the condition image "
                                  "(kv_caches), then reads the cache in every step; " + NO_TINY_CONFIG_YET,
    "QwenImage21Transformer2DModel": "its pipeline passes a key/value cache of the conditioning tokens with a mode "
                                     "(kv_cache, kv_cache_mode); " + NO_TINY_CONFIG_YET,
    "NucleusMoEImageTransformer2DModel": "mixture-of-experts blocks with per-expert capacity (routing over the "
                                         "tokens); " + NO_TINY_CONFIG_YET,
    "WanAnimateTransformer3DModel": "Wan with a motion encoder over 512x512 face crops and pose latents; "
                                    + NO_TINY_CONFIG_YET,
    "HeliosTransformer3DModel": "FramePack-style short, mid and long history latents; " + NO_TINY_CONFIG_YET,
})
for _name in [
    "AnyFlowFARTransformer3DModel", "AnyFlowTransformer3DModel", "BriaFibo2Transformer2DModel",
    "DreamLiteTransformer2DModel",
    "GlmImageTransformer2DModel", "HeliosTransformer3DModel",
    "Ideogram4Transformer2DModel", "JoyImageEditPlusTransformer3DModel",
    "JoyImageEditTransformer3DModel", "Kandinsky6SRTransformer3DModel", "Kandinsky6Transformer3DModel",
    "MiniMaxH3Transformer3DModel",
    "MotifVideoTransformer3DModel", "NucleusMoEImageTransformer2DModel",
    "QwenImage21Transformer2DModel", "SanaWMLTX2RefinerTransformer3DModel",
    "SanaWMTransformer3DModel", "WanAnimate2Transformer3DModel", "WanAnimateTransformer3DModel",
]:
    NOT_IN_SUITE.setdefault(_name, NO_TINY_CONFIG_YET)


def exported_transformers() -> set[str]:
    return {name for name in dir(diffusers) if "Transformer" in name and name.endswith("Model")}


def test_every_exported_transformer_is_tested_or_listed():
    exported = exported_transformers()
    unaccounted = sorted(exported - TESTED.keys() - NOT_IN_SUITE.keys())
    assert not unaccounted, (
        f"diffusers {diffusers.__version__} exports transformer classes the suite neither runs nor lists: "
        f"{unaccounted}. Give each a tiny config in tests/tiny_models.py (and add it to TESTED), or an entry in "
        "NOT_IN_SUITE saying what is known of it")
    gone = sorted((TESTED.keys() | NOT_IN_SUITE.keys()) - exported)
    assert not gone, f"listed here but not exported by diffusers {diffusers.__version__}: {gone}"


@pytest.mark.parametrize("name", sorted(TESTED))
def test_tested_classes_have_their_tiny_cases(name):
    assert TESTED[name] and not set(TESTED) & set(NOT_IN_SUITE)
    for case in TESTED[name]:
        assert type(CASES[case].build()).__name__ == name, (name, case)
