// Package gating will hold the gating node: embeddings, attention and the
// router run locally, expert selection by latency and reputation, dispatch
// with hedging and re-dispatch, the generation loop and the
// OpenAI-compatible HTTP API. It is built by the gating issue; today it has
// no code.
package gating
