//! `distill inspect MODEL`: architecture, sizes, stored dtypes, tokenizer.
use anyhow::Result;
use distill::model::LoadedModel;

pub fn run(m: &LoadedModel) -> Result<()> {
    let c = &m.model.config;
    println!("model:          {}", m.source.display());
    println!("format:         {}", m.format);
    println!(
        "architecture:   {} ({})",
        c.arch.model_type(),
        c.arch.hf_class()
    );
    println!(
        "parameters:     {} ({:.1}M)",
        c.num_params(),
        c.num_params() as f64 / 1e6
    );
    println!("layers:         {}", c.num_hidden_layers);
    println!("hidden size:    {}", c.hidden_size);
    println!("intermediate:   {}", c.intermediate_size);
    println!(
        "heads:          {} query / {} key-value, head dim {}",
        c.num_attention_heads, c.num_key_value_heads, c.head_dim
    );
    println!("vocab:          {}", c.vocab_size);
    println!("context:        {}", c.max_position_embeddings);
    println!(
        "rope:           theta {} scaling {:?}",
        c.rope_theta, c.rope_scaling
    );
    println!("tied embedding: {}", c.tie_word_embeddings);
    let types: Vec<String> = m
        .weight_types
        .iter()
        .map(|(k, v)| format!("{k} x{v}"))
        .collect();
    println!("stored dtypes:  {} (computed in f32)", types.join(", "));
    match &m.tokenizer {
        Some(t) => {
            println!(
                "tokenizer:      {} tokens, bos {:?}, eos {:?}",
                t.vocab_size(),
                t.bos_token,
                t.eos_token
            );
            println!(
                "chat template:  {}",
                if t.chat_template.is_some() {
                    "present"
                } else {
                    "absent"
                }
            );
        }
        None => println!("tokenizer:      absent"),
    }
    Ok(())
}
