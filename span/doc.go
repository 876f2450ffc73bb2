// Package span runs runs of a model's layers on other nodes: one round
// trip per span per forward pass instead of one per MoE layer.
//
// A span node hosts layers [a, b) of a model — their attention, norms and
// routers (format 2's layer shards, loaded as a moe.Part) — and serves
// neuropb.SpanProtocol with a Server: given a head's session, the hidden
// states entering layer a and their position, it runs the layers with a
// KV cache of its own for that session, calling the layers' experts
// (its own, or other nodes' as a gating node calls them), and returns the
// hidden states leaving layer b-1.
//
// A span node that calls experts on other nodes gives each session
// SessionExperts: its calls are checked as a gating node checks its own,
// a result found wrong makes the span node drop its cache from the first
// position it changed and say so in its next answer (wrong_from), which
// the head rewinds to; a head syncs with such a node before it calls a
// generation done, pays its expert calls through a delegation of the
// session's escrow, and settles the experts' receipts the span node
// forwards. A span node's receipts sign each request's rows after the
// digest chain of the session's earlier ones (neuropb.SpanChain), which
// makes a wrong span answer evidence for a verdict; Server.Rerun computes
// one again from the rows it carries.
//
// A head (the node with the tokenizer, embeddings, output head and the
// sessions) computes through a Chain, a moe.Gating whose sessions embed
// locally, run any first layers the head hosts, send the rows through
// each span in order and apply the output head. The hidden states travel
// in F32, so that the result is the whole model's to the bit. Each
// session keeps, per span, the inputs it sent (Embd floats per token): a
// provider that fails or stalls is replaced by the next of its hop, which
// answers that it holds fewer tokens than the request's position and is
// sent the earlier inputs again, in the same requests, so that its KV
// cache is the first provider's to the bit (Petals' approach). A rewind
// (speculative decoding's rejected drafts) is a request at an earlier
// position: the span node drops the tokens past it.
//
// Lifecycle, as every service of neuro: NewServer takes every dependency
// and checks it; Start registers the protocol handler and starts the
// janitor that drops sessions idle past ServerConfig.IdleTimeout; Close
// is idempotent, resets open streams, frees every KV cache and returns
// once its goroutines have ended. A Chain owns no goroutine; a Session's
// Close drops its sessions on the span nodes.
package span
