"""Chat constants shared by the data, the demo assets, the tiny test assets and the scripts.

A leaf module (standard library only, imports nothing from rlhf_lit): anything may import it,
and ``scripts/build_preference_pairs.py`` reads it without importing torch.
"""

#: The system turn put before every prompt that has none (social-sim's persona instruction).
DEFAULT_SYSTEM_PROMPT = (
    "You are a user on a social media platform. Write a new post, or a comment in response to a "
    "thread. Only write in character."
)

#: ChatML, as Qwen2.5 renders it (without Qwen's automatic default system message). The demo and
#: the tiny test tokenizers carry it; a real Qwen tokenizer brings its own.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
