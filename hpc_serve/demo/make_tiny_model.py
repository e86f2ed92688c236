"""Make a tiny random Qwen2 chat model offline (no hub): python make_tiny_model.py OUT_DIR.

Runs in the vLLM venv (it has torch, transformers, tokenizers). About 750 KB, 4 s. The text it
generates is gibberish, which is fine: the tests check the API's behaviour, not the words.
"""

import json
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = ["The quick brown fox jumps over the lazy dog.", "Hello, world! How are you today?",
          "Large language models are served on clusters of GPUs.", "One two three four five six.",
          "user assistant system: answer the question briefly."] * 20
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def main(out: Path) -> None:
    torch.manual_seed(0)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token=None, unk_token=None)
    fast.chat_template = CHAT_TEMPLATE
    config = Qwen2Config(vocab_size=fast.vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
                         tie_word_embeddings=True, eos_token_id=fast.convert_tokens_to_ids("<|im_end|>"),
                         bos_token_id=None, torch_dtype="bfloat16")
    model = Qwen2ForCausalLM(config).to(torch.bfloat16)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    fast.save_pretrained(out)
    GenerationConfig(eos_token_id=config.eos_token_id, pad_token_id=fast.pad_token_id).save_pretrained(out)
    print(json.dumps({"model": str(out), "vocab": fast.vocab_size}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
