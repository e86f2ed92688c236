"""A random-weight Qwen2 of about 0.3 B parameters with an offline BPE tokenizer, made on the GPU in
about 15 s: what the GPU tier and benchmarks/gpu_serving.py serve. Usage: python benchmarks/gpu_model.py OUT_DIR"""
import os, sys, torch
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers, processors
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM, GenerationConfig
OUT = sys.argv[1]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
corpus = [" ".join(f"w{i}{j} tok{j*i%97} {chr(65+i%26)}{j}" for j in range(200)) for i in range(300)]
tok = Tokenizer(models.BPE()); tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel(); tok.post_processor = processors.ByteLevel(trim_offsets=False)
tok.train_from_iterator(corpus, trainer=trainers.BpeTrainer(vocab_size=8192, min_frequency=1, special_tokens=SPECIALS,
                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                               additional_special_tokens=["<|im_start|>", "<|im_end|>"], model_max_length=4096)
fast.chat_template = TEMPLATE
os.makedirs(OUT, exist_ok=True); fast.save_pretrained(OUT)
eos, pad = fast.convert_tokens_to_ids("<|im_end|>"), fast.convert_tokens_to_ids("<|endoftext|>")
cfg = Qwen2Config(vocab_size=len(fast), hidden_size=1024, intermediate_size=2816, num_hidden_layers=24,
                  num_attention_heads=16, num_key_value_heads=8, head_dim=64, max_position_embeddings=4096,
                  rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=pad, eos_token_id=eos,
                  pad_token_id=pad, torch_dtype="bfloat16")
torch.manual_seed(0)
with torch.device("cuda"):
    model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
model.save_pretrained(OUT, safe_serialization=True)
GenerationConfig(bos_token_id=pad, eos_token_id=eos, pad_token_id=pad).save_pretrained(OUT)
print("vocab", len(fast), "params", sum(p.numel() for p in model.parameters()))
