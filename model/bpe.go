package model

import "fmt"

// A GPT-2 byte-level BPE tokenizer, as Qwen3, gpt-oss, GLM and DeepSeek
// ship (tokenizer.ggml.model = "gpt2"): every byte has a symbol (GPT-2's
// bytes_to_unicode), merges join symbols into longer tokens, and control
// tokens come last. What llama.cpp requires of it is in ../shared/MODELS.md.

// byteSymbols is GPT-2's bytes_to_unicode: printable bytes stand for
// themselves, the others (space, control bytes, …) for the runes from 256
// up, in byte order ("Ġ" is the space, "Ċ" the newline).
func byteSymbols() [256]string {
	var out [256]string
	next := 256
	for b := range 256 {
		if (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF) {
			out[b] = string(rune(b))
		} else {
			out[b] = string(rune(next))
			next++
		}
	}
	return out
}

// bpeControls are each architecture's control tokens, after every other
// token: Qwen's ChatML ones, gpt-oss's harmony ones, DeepSeek's, GLM-4's
// role tokens.
var bpeControls = map[string][]string{
	"qwen3moe": {"<|endoftext|>", "<|im_start|>", "<|im_end|>"},
	// gpt-oss's harmony tokens (o200k_harmony): llama.cpp ends a
	// generation at <|return|> or <|call|>, not at <|end|>.
	"gpt-oss": {"<|startoftext|>", "<|endoftext|>", "<|return|>", "<|constrain|>", "<|channel|>", "<|start|>", "<|end|>",
		"<|message|>", "<|call|>"},
	// DeepSeek-V3's (the fullwidth bars and ▁ are theirs).
	"deepseek2": {"<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"},
	"glm4moe":   {"<|endoftext|>", "[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"},
}

// bpeUserTokens are each architecture's user-defined tokens, before the
// control tokens: the thinking tags of the models that reason in them
// (Qwen3, DeepSeek-R1, GLM-4.5), whole tokens that render as text.
var bpeUserTokens = map[string][]string{
	"qwen3moe":  {"<think>", "</think>"},
	"deepseek2": {"<think>", "</think>"},
	"glm4moe":   {"<think>", "</think>"},
}

// chatTemplates are short templates of each architecture's chat format:
// llama.cpp recognises the family by its markers (ChatML's <|im_start|>,
// GLM-4's [gMASK]<sop>) and formats the chat itself.
var chatTemplates = map[string]string{
	"qwen3moe": "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}" +
		"{% if add_generation_prompt %}{{'<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n'}}{% endif %}",
	// harmony: llama.cpp knows it by <|start|> and <|channel|>.
	"gpt-oss": "{% for m in messages %}<|start|>{{ m['role'] }}<|message|>{{ m['content'] }}<|end|>{% endfor %}" +
		"{% if add_generation_prompt %}<|start|>assistant{% endif %}{# <|channel|>final #}",
	// DeepSeek-V3's: llama.cpp knows it by <｜User｜>, <｜Assistant｜> and
	// <｜end▁of▁sentence｜>.
	"deepseek2": "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<｜User｜>{{ m['content'] }}" +
		"{% elif m['role'] == 'assistant' %}<｜Assistant｜>{{ m['content'] }}<｜end▁of▁sentence｜>{% else %}{{ m['content'] }}\n\n{% endif %}" +
		"{% endfor %}{% if add_generation_prompt %}<｜Assistant｜>{% endif %}",
	"glm4moe": "[gMASK]<sop>{% for m in messages %}<|{{ m['role'] }}|>\\n{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}",
}

// bpeVocabulary makes n tokens: the 256 byte symbols, tokens merged from
// them (first's words, common words with and without a leading space, then letter pairs,
// then longer runs) with the merges that make them, the user-defined
// tokens and the control tokens. The same n always gives the same vocabulary.
func bpeVocabulary(n int, user, controls, first []string) (tokens []string, types []int32, merges []string) {
	sym := byteSymbols()
	seen := map[string]bool{}
	for _, s := range sym {
		tokens, types = append(tokens, s), append(types, tokNormal)
		seen[s] = true
	}
	room := n - len(user) - len(controls)
	// merge adds the token a+b (and its merge) when both parts exist.
	merge := func(a, b string) string {
		t := a + b
		if !seen[t] && seen[a] && seen[b] && len(tokens) < room {
			seen[t] = true
			tokens, types, merges = append(tokens, t), append(types, tokNormal), append(merges, a+" "+b)
		}
		return t
	}
	// word merges a word's symbols left to right ("Ġ t" → "Ġt", "Ġt h" →
	// "Ġth", …), as BPE applies them.
	word := func(w string) {
		parts := []string{}
		for _, c := range []byte(w) {
			parts = append(parts, sym[c])
		}
		acc := parts[0]
		for _, p := range parts[1:] {
			acc = merge(acc, p)
		}
	}
	for _, w := range first {
		word(w)
	}
	for _, w := range commonWords {
		word(" " + w)
		word(w)
	}
	for c1 := 'a'; c1 <= 'z'; c1++ {
		for c2 := 'a'; c2 <= 'z'; c2++ {
			word(string(c1) + string(c2))
			word(" " + string(c1) + string(c2))
		}
	}
	for i := 0; len(tokens) < room; i++ {
		word(fmt.Sprintf(" w%d", i))
	}
	for _, u := range user {
		tokens, types = append(tokens, u), append(types, tokUser)
	}
	for _, c := range controls {
		tokens, types = append(tokens, c), append(types, tokControl)
	}
	return tokens, types, merges
}
