"""Tiny offline models for curate.py, built from configs (the other test_curate_* files import the builders):
a Qwen2.5-VL with a word-level tokenizer and Qwen's chat format (random, or with weights set so that greedy decoding
writes a fixed answer), a Qwen2 text model, and an SD3 pipeline. Checked here through the same loaders curate.py
uses (AutoProcessor / AutoModelForImageTextToText / DiffusionPipeline from a local folder)."""

import json
import os

import numpy as np
import torch
from PIL import Image

import curate
from common import parse_config
from data import vlm_prompts as vp

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
           "<|video_pad|>"]
# answers both the Analyst (a compliant face) and the Caption Creator; every word once, so it is a chain of tokens
SCRIPT = ("Reasoning: clear frontal face Objects: None Negation: False Short Caption: woman smiling in park "
          "Long Prompt: A young lady with fair skin grinning outdoors")
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
            "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|>"
            "<|vision_end|>{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def word_tokenizer(extra_words=()):
    """Word-level tokenizer (split on spaces) with Qwen's special tokens and chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["system", "user", "assistant", "<unk>"] + sorted(set(SCRIPT.split()) | set(extra_words))
    t = Tokenizer(models.WordLevel({w: i for i, w in enumerate(SPECIAL + words)}, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    t.add_special_tokens(SPECIAL)  # matched before splitting: <|image_pad|><|image_pad|>... are separate tokens
    return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", pad_token="<|endoftext|>",
                                   eos_token="<|im_end|>", extra_special_tokens={}, chat_template=TEMPLATE)


def script_weights(model, tok, script, hidden):
    """Zero every attention and MLP output of the language model, so its last hidden state is the embedding of the
    current token; give the last prompt token and each token of `script` their own basis vector, and point the LM
    head from each to the next (the last to <|im_end|>). Greedy decoding then writes `script`, whatever the input."""
    prompt = tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False, add_generation_prompt=True)
    chain = tok(prompt).input_ids[-1:] + tok(script).input_ids + [tok.convert_tokens_to_ids("<|im_end|>")]
    assert len(set(chain)) == len(chain) <= hidden  # a token followed by two different ones cannot be scripted
    lm, emb = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")) and "visual" not in name:
                p.zero_()
        lm.zero_()
        for j, (a, b) in enumerate(zip(chain, chain[1:])):
            emb[a] = torch.nn.functional.one_hot(torch.tensor(j), hidden).float()
            lm[b, j] = 10.0


def tiny_vlm(folder, script=None, seed=0):
    """Save a tiny Qwen2.5-VL + processor to folder. script=None: random weights (garbage answers); a string: the
    answer it always gives ("" = it returns nothing)."""
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
                              Qwen2VLImageProcessor, Qwen2VLVideoProcessor)

    tok = word_tokenizer("Enhanced Prompt: olive".split() + vp.ANALYST_USER.split()[:40])
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL}
    hidden = 32
    cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]},
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden,
                           fullatt_block_indexes=[0], window_size=56),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    if script is not None:
        script_weights(model, tok, script, hidden)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    images = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=56 * 56 * 4)  # at most 16 patches per image
    Qwen2_5_VLProcessor(images, tok, Qwen2VLVideoProcessor(), chat_template=TEMPLATE).save_pretrained(folder)
    model.save_pretrained(folder)
    return folder


def tiny_text_model(folder, script):
    """Save a tiny Qwen2 causal LM that always answers `script`, with a byte-level BPE Qwen2Tokenizer (the class
    AutoTokenizer picks for model type qwen2) trained here on the words it needs (the refiner's text model)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator([script, "system user assistant"] * 4, trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL[:3], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bpe = json.loads(bpe.to_str())["model"]
    tok = Qwen2Tokenizer(vocab=bpe["vocab"], merges=[tuple(m) for m in bpe["merges"]], eos_token="<|im_end|>",
                         pad_token="<|endoftext|>", chat_template=TEMPLATE)
    tok.add_tokens(["<|im_start|>"], special_tokens=True)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = Qwen2ForCausalLM(cfg).eval()
    script_weights(model, tok, script, 32)
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = tok.eos_token_id, tok.pad_token_id
    tok.save_pretrained(folder)
    model.save_pretrained(folder)
    return folder


def tiny_sd3(folder):
    """Save a tiny Stable Diffusion 3 pipeline (1-layer MMDiT, 2-level VAE, two tiny CLIPs, a tiny T5)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from diffusers import StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel
    from transformers import T5Tokenizer

    torch.manual_seed(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    os.makedirs(folder, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "!": 1, "<|endoftext|>": 2, **{c + e: 3 + 2 * i + (e == "</w>")
                                                                  for i, c in enumerate(letters) for e in ("", "</w>")}}
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")  # characters only, no merges
    clip_tok = CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"), pad_token="!",
                             model_max_length=77)
    clip = CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                          num_attention_heads=4, projection_dim=32, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    t5_tok = T5Tokenizer(vocab=[("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(c, -1.0) for c in letters]
                         + [("\u2581" + c, -1.0) for c in letters], extra_ids=0, model_max_length=256)
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=32, d_ff=37, d_kv=8, num_layers=1, num_heads=4))
    pipe = StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=1,
                                          attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                          caption_projection_dim=16, pooled_projection_dim=64, out_channels=4),
        vae=AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                          up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4,
                          layers_per_block=1, shift_factor=0.0609, scaling_factor=1.5035),
        scheduler=FlowMatchEulerDiscreteScheduler(), text_encoder=CLIPTextModelWithProjection(clip),
        tokenizer=clip_tok, text_encoder_2=CLIPTextModelWithProjection(clip), tokenizer_2=clip_tok,
        text_encoder_3=t5, tokenizer_3=t5_tok)
    pipe.save_pretrained(folder)
    return folder


def config(tmp_path, *extra):
    return parse_config(curate.Config, curate.PRESETS, [f"--out_dir={tmp_path / 'out'}", "--device=cpu",
                                                        "--workers=2", *extra])


def test_scripted_vlm_answers_its_script_batched(tmp_path, one_thread):
    """The real load + chat + generate path (left padding, two images of different sizes in one batch)."""
    cfg = config(tmp_path, f"--vlm_model={tiny_vlm(str(tmp_path / 'vlm'), SCRIPT)}")
    run = curate.Run((0, 1), "cpu", None)
    model, proc = curate.load_model(cfg, run, "vlm")
    images = [Image.fromarray(np.full((h, w, 3), c, np.uint8)) for h, w, c in ((60, 90, 20), (120, 56, 200))]
    answers = vp.chat(model, proc, vp.ANALYST_SYSTEM, [vp.ANALYST_USER, "user"], images)
    assert answers == [SCRIPT, SCRIPT]
    assert vp.parse_analyst(answers[0])["compliant"] and vp.parse_captions(answers[0])[0] == "woman smiling in park"
    assert curate.load_model(cfg, run, "refiner")[0] is model  # no refiner_model: the VLM answers text prompts


def test_text_model_and_sd3_pipeline_load_from_folders(tmp_path, one_thread):
    refined = "Enhanced Prompt: a man with olive skin"
    cfg = config(tmp_path, f"--refiner_model={tiny_text_model(str(tmp_path / 'lm'), refined)}",
                 f"--synth_model={tiny_sd3(str(tmp_path / 'sd3'))}", "--synth_size=32", "--synth_steps=2")
    run = curate.Run((0, 1), "cpu", None)
    model, tok = curate.load_model(cfg, run, "refiner")
    assert vp.chat(model, tok, vp.REFINER_SYSTEM, ["a man", "a woman"]) == [refined, refined]
    pipe = curate.load_model(cfg, run, "synth")
    assert run.model[0][0] == "synth"  # one model at a time: the text model is gone
    g = [torch.Generator().manual_seed(s) for s in (1, 1, 2)]
    images = pipe(prompt=["a man"] * 3, height=32, width=32, num_inference_steps=2, generator=g).images
    arr = [np.asarray(im) for im in images]
    assert images[0].size == (32, 32) and np.array_equal(arr[0], arr[1]) and not np.array_equal(arr[0], arr[2])
