// Package model reads and writes neuro's model files: GGUF (a bounded,
// validated reader and a deterministic writer), the seeded generator of
// Mixtral-layout test models, and the content-addressed shards a model is
// split into (one per layer and expert, plus the gating shard), listed by a
// manifest whose CID is the model's ID.
package model
