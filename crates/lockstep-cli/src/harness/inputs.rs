//! The inputs of the forward phases and the texts of the tokenization phase.

/// Which phase an input belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputKind {
    /// A prompt of the single-token forward phase (the old report's prompts).
    Single,
    /// A multi-token sequence.
    Multi,
}

/// One input of the forward phases.
#[derive(Debug, Clone)]
pub struct Input {
    /// Short label for tables.
    pub label: String,
    /// The text.
    pub text: String,
    /// The phase it belongs to.
    pub kind: InputKind,
}

/// A paragraph long enough (about 300 tokens) to exercise positions beyond 256, where bf16
/// positions and RoPE errors show (`data/long_paragraph.txt`, without its final newline).
pub fn long_text() -> &'static str {
    include_str!("../../data/long_paragraph.txt").trim_end()
}

/// The default inputs: the old report's three prompts, a short sentence and a long paragraph.
pub fn default_inputs() -> Vec<Input> {
    let mut v: Vec<Input> = ["Hello", "The", "123"]
        .iter()
        .map(|p| Input {
            label: format!("{p:?}"),
            text: p.to_string(),
            kind: InputKind::Single,
        })
        .collect();
    v.push(Input {
        label: "short sentence".into(),
        text: "The quick brown fox jumps over the lazy dog, and 12 of 15 wizards agree.".into(),
        kind: InputKind::Multi,
    });
    v.push(Input {
        label: "long paragraph".into(),
        text: long_text().into(),
        kind: InputKind::Multi,
    });
    v
}

/// Strings with special tokens, checked in the tokenization phase when the tokenizer knows them.
pub const SPECIAL_TEXTS: [&str; 2] = [
    "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n",
    "Hello<|endoftext|>",
];

/// Conversations of the chat-template check: a single turn, system + multi-turn, and a tools list.
pub fn chat_conversations() -> serde_json::Value {
    serde_json::json!([
        {"messages": [{"role": "user", "content": "What is the capital of France?"}], "tools": null},
        {"messages": [
            {"role": "system", "content": "You are a terse assistant."},
            {"role": "user", "content": "Hello!"},
            {"role": "assistant", "content": "Hi. What do you need?"},
            {"role": "user", "content": "Two plus two, please."}
        ], "tools": null},
        {"messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": [
            {"type": "function", "function": {"name": "get_weather", "description": "Current weather <for> a city",
             "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
        ]}
    ])
}

/// The labels of [`chat_conversations`], in order.
pub const CHAT_LABELS: [&str; 3] = ["single turn", "system + multi-turn", "tools list"];
