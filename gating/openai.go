package gating

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strings"
	"time"

	"github.com/ipfs/go-cid"

	"github.com/neuro-p2p/neuro/neuropb"
)

// maxHTTPBody bounds an HTTP API request body.
const maxHTTPBody = 1 << 20

// HTTPHandler serves the OpenAI-compatible API of a gating node:
// GET /v1/models, POST /v1/completions and POST /v1/chat/completions,
// with and without streaming (server-sent events). Models are named by
// their CID; a request that names none uses the only model served, if
// there is one. Errors have OpenAI's shape:
// {"error": {"message", "type", "param", "code"}}.
func HTTPHandler(e *Engine, log *slog.Logger) http.Handler {
	if log == nil {
		log = slog.Default()
	}
	a := &httpAPI{e: e, log: log.With("component", "http-api"), created: time.Now().Unix()}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/models", a.models)
	mux.HandleFunc("GET /v1/models/{id}", a.model)
	mux.HandleFunc("POST /v1/completions", a.completions)
	mux.HandleFunc("POST /v1/chat/completions", a.chat)
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/v1/models", "/v1/completions", "/v1/chat/completions":
			writeError(w, http.StatusMethodNotAllowed, "invalid_request_error", "", fmt.Sprintf("method %s is not allowed on %s", r.Method, r.URL.Path))
			return
		}
		writeError(w, http.StatusNotFound, "invalid_request_error", "", fmt.Sprintf("no route %s %s (see /v1/models, /v1/completions, /v1/chat/completions)", r.Method, r.URL.Path))
	})
	return mux
}

type httpAPI struct {
	e       *Engine
	log     *slog.Logger
	created int64
}

type apiError struct {
	Message string  `json:"message"`
	Type    string  `json:"type"`
	Param   *string `json:"param"`
	Code    *string `json:"code"`
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	enc := json.NewEncoder(w)
	enc.SetEscapeHTML(false)
	_ = enc.Encode(v)
}

func writeError(w http.ResponseWriter, status int, typ, code, msg string) {
	e := apiError{Message: msg, Type: typ}
	if code != "" {
		e.Code = &code
	}
	writeJSON(w, status, map[string]apiError{"error": e})
}

// writeGenError maps an engine error to an HTTP status and error body.
func writeGenError(w http.ResponseWriter, err error) {
	var ge *Error
	if !errors.As(err, &ge) {
		writeError(w, http.StatusInternalServerError, "server_error", "", err.Error())
		return
	}
	switch ge.Code {
	case neuropb.InferError_CODE_BAD_REQUEST:
		writeError(w, http.StatusBadRequest, "invalid_request_error", "", ge.Msg)
	case neuropb.InferError_CODE_UNKNOWN_MODEL:
		writeError(w, http.StatusNotFound, "invalid_request_error", "model_not_found", ge.Msg)
	case neuropb.InferError_CODE_BUSY:
		w.Header().Set("Retry-After", "1")
		writeError(w, http.StatusServiceUnavailable, "server_error", "busy", ge.Msg)
	case neuropb.InferError_CODE_NO_PROVIDER:
		writeError(w, http.StatusServiceUnavailable, "server_error", "no_provider", ge.Msg)
	default:
		writeError(w, http.StatusInternalServerError, "server_error", "", ge.Msg)
	}
}

type modelObject struct {
	ID      string `json:"id"`
	Object  string `json:"object"`
	Created int64  `json:"created"`
	OwnedBy string `json:"owned_by"`
	// Ready and ContextLength are neuro's additions.
	Ready         bool `json:"ready"`
	ContextLength int  `json:"context_length,omitempty"`
}

func (a *httpAPI) modelObjects() []modelObject {
	out := []modelObject{}
	for _, m := range a.e.Models() {
		out = append(out, modelObject{ID: m.CID.String(), Object: "model", Created: a.created, OwnedBy: "neuro",
			Ready: m.Ready, ContextLength: m.Context})
	}
	return out
}

func (a *httpAPI) models(w http.ResponseWriter, _ *http.Request) {
	writeJSON(w, http.StatusOK, map[string]any{"object": "list", "data": a.modelObjects()})
}

func (a *httpAPI) model(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	for _, m := range a.modelObjects() {
		if m.ID == id {
			writeJSON(w, http.StatusOK, m)
			return
		}
	}
	writeError(w, http.StatusNotFound, "invalid_request_error", "model_not_found", fmt.Sprintf("model %q is not served here", id))
}

// stringList is a JSON string or array of strings (OpenAI's prompt and
// stop).
type stringList []string

func (s *stringList) UnmarshalJSON(b []byte) error {
	if bytes.Equal(b, []byte("null")) {
		*s = nil
		return nil
	}
	var one string
	if err := json.Unmarshal(b, &one); err == nil {
		*s = stringList{one}
		return nil
	}
	var many []string
	if err := json.Unmarshal(b, &many); err != nil {
		return errors.New("want a string or an array of strings")
	}
	*s = many
	return nil
}

// common are the fields completions and chat share.
type common struct {
	Model       string     `json:"model"`
	MaxTokens   *int       `json:"max_tokens"`
	MaxCompl    *int       `json:"max_completion_tokens"`
	Temperature *float32   `json:"temperature"`
	TopP        *float32   `json:"top_p"`
	TopK        *int       `json:"top_k"`
	Seed        *int64     `json:"seed"`
	Stop        stringList `json:"stop"`
	Stream      bool       `json:"stream"`
	N           *int       `json:"n"`
}

type completionRequest struct {
	common
	Prompt *stringList `json:"prompt"`
}

type chatRequest struct {
	common
	Messages []struct {
		Role    string          `json:"role"`
		Content json.RawMessage `json:"content"`
	} `json:"messages"`
}

// decode reads a JSON body into v, answering the error itself.
func decode(w http.ResponseWriter, r *http.Request, v any) bool {
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxHTTPBody))
	if err != nil {
		var mb *http.MaxBytesError
		if errors.As(err, &mb) {
			writeError(w, http.StatusRequestEntityTooLarge, "invalid_request_error", "", fmt.Sprintf("request body over %d bytes", mb.Limit))
			return false
		}
		writeError(w, http.StatusBadRequest, "invalid_request_error", "", "read request body: "+err.Error())
		return false
	}
	if err := json.Unmarshal(body, v); err != nil {
		writeError(w, http.StatusBadRequest, "invalid_request_error", "", "malformed JSON body: "+err.Error())
		return false
	}
	return true
}

// request builds the engine's request from the common fields.
func (a *httpAPI) request(c common) (*neuropb.InferRequest, string, error) {
	if c.N != nil && *c.N != 1 {
		return nil, "n", fmt.Errorf("n = %d: only one choice per request is supported", *c.N)
	}
	model := c.Model
	if model == "" {
		ms := a.e.Models()
		if len(ms) != 1 {
			return nil, "model", errors.New("model is required (GET /v1/models lists them)")
		}
		model = ms[0].CID.String()
	}
	mc, err := cid.Decode(model)
	if err != nil {
		return nil, "model", fmt.Errorf("model %q is not a CID (GET /v1/models lists the models served)", model)
	}
	s := &neuropb.Sampling{Stop: c.Stop, Temperature: 1}
	if c.Temperature != nil {
		s.Temperature = *c.Temperature
	}
	if c.TopP != nil {
		s.TopP = *c.TopP
	}
	if c.TopK != nil {
		if *c.TopK < 0 {
			return nil, "top_k", fmt.Errorf("top_k %d is negative", *c.TopK)
		}
		s.TopK = uint32(*c.TopK)
	}
	if c.Seed != nil {
		seed := uint64(*c.Seed)
		s.Seed = &seed
	}
	mt := c.MaxTokens
	if c.MaxCompl != nil {
		mt = c.MaxCompl
	}
	if mt != nil {
		if *mt < 1 || *mt > neuropb.MaxGenerateTokens {
			return nil, "max_tokens", fmt.Errorf("max_tokens %d: want 1 to %d", *mt, neuropb.MaxGenerateTokens)
		}
		s.MaxTokens = uint32(*mt)
	}
	return &neuropb.InferRequest{Model: mc.Bytes(), Sampling: s}, "", nil
}

func (a *httpAPI) completions(w http.ResponseWriter, r *http.Request) {
	var req completionRequest
	if !decode(w, r, &req) {
		return
	}
	ir, param, err := a.request(req.common)
	if err != nil {
		writeParamError(w, param, err)
		return
	}
	if req.Prompt == nil || len(*req.Prompt) != 1 {
		writeParamError(w, "prompt", errors.New("prompt must be one string"))
		return
	}
	ir.Prompt = (*req.Prompt)[0]
	if ir.Prompt == "" {
		writeParamError(w, "prompt", errors.New("prompt is empty"))
		return
	}
	a.run(w, r, ir, false, req.Model, req.Stream)
}

func (a *httpAPI) chat(w http.ResponseWriter, r *http.Request) {
	var req chatRequest
	if !decode(w, r, &req) {
		return
	}
	ir, param, err := a.request(req.common)
	if err != nil {
		writeParamError(w, param, err)
		return
	}
	if len(req.Messages) == 0 {
		writeParamError(w, "messages", errors.New("messages is empty"))
		return
	}
	for i, m := range req.Messages {
		content, err := messageText(m.Content)
		if err != nil {
			writeParamError(w, fmt.Sprintf("messages[%d].content", i), err)
			return
		}
		ir.Messages = append(ir.Messages, &neuropb.ChatMessage{Role: m.Role, Content: content})
	}
	a.run(w, r, ir, true, req.Model, req.Stream)
}

// messageText reads a message's content: a string, or an array of parts
// of which only text parts are supported.
func messageText(raw json.RawMessage) (string, error) {
	var s string
	if err := json.Unmarshal(raw, &s); err == nil {
		return s, nil
	}
	var parts []struct {
		Type string `json:"type"`
		Text string `json:"text"`
	}
	if err := json.Unmarshal(raw, &parts); err != nil {
		return "", errors.New("content must be a string or an array of text parts")
	}
	var b strings.Builder
	for _, p := range parts {
		if p.Type != "text" {
			return "", fmt.Errorf("content part of type %q is not supported (text only)", p.Type)
		}
		b.WriteString(p.Text)
	}
	return b.String(), nil
}

func writeParamError(w http.ResponseWriter, param string, err error) {
	e := apiError{Message: err.Error(), Type: "invalid_request_error"}
	if param != "" {
		e.Param = &param
	}
	writeJSON(w, http.StatusBadRequest, map[string]apiError{"error": e})
}

func finishReason(r neuropb.FinishReason) string {
	if r == neuropb.FinishReason_FINISH_REASON_LENGTH {
		return "length"
	}
	return "stop"
}

func newID(prefix string) string {
	var b [12]byte
	_, _ = rand.Read(b[:])
	return prefix + hex.EncodeToString(b[:])
}

type usage struct {
	PromptTokens     int `json:"prompt_tokens"`
	CompletionTokens int `json:"completion_tokens"`
	TotalTokens      int `json:"total_tokens"`
}

// run generates and answers, as one JSON object or as server-sent events.
func (a *httpAPI) run(w http.ResponseWriter, r *http.Request, ir *neuropb.InferRequest, chat bool, model string, stream bool) {
	if model == "" {
		c, _ := cid.Cast(ir.GetModel())
		model = c.String()
	}
	id, object, chunkObject := newID("cmpl-"), "text_completion", "text_completion"
	if chat {
		id, object, chunkObject = newID("chatcmpl-"), "chat.completion", "chat.completion.chunk"
	}
	created := time.Now().Unix()
	if !stream {
		res, err := a.e.Generate(r.Context(), ir, Callbacks{})
		if err != nil {
			writeGenError(w, err)
			return
		}
		choice := map[string]any{"index": 0, "finish_reason": finishReason(res.Reason), "logprobs": nil}
		if chat {
			choice["message"] = map[string]string{"role": "assistant", "content": res.Text}
		} else {
			choice["text"] = res.Text
		}
		writeJSON(w, http.StatusOK, map[string]any{"id": id, "object": object, "created": created, "model": model,
			"choices": []any{choice},
			"usage":   usage{res.PromptTokens, len(res.Tokens), res.PromptTokens + len(res.Tokens)}})
		return
	}
	flusher, _ := w.(http.Flusher)
	started := false
	event := func(v any) error {
		b, err := json.Marshal(v)
		if err != nil {
			return err
		}
		if _, err := fmt.Fprintf(w, "data: %s\n\n", b); err != nil {
			return err
		}
		if flusher != nil {
			flusher.Flush()
		}
		return nil
	}
	chunk := func(delta string, first bool, finish *string) map[string]any {
		choice := map[string]any{"index": 0, "finish_reason": finish, "logprobs": nil}
		if chat {
			d := map[string]string{}
			if first {
				d["role"] = "assistant"
			}
			if delta != "" || !first {
				d["content"] = delta
			}
			choice["delta"] = d
		} else {
			choice["text"] = delta
		}
		return map[string]any{"id": id, "object": chunkObject, "created": created, "model": model, "choices": []any{choice}}
	}
	res, err := a.e.Generate(r.Context(), ir, Callbacks{
		// Headers go out once the prompt is accepted, so that a refused
		// request still gets an HTTP error status.
		Start: func(int, time.Duration) error {
			w.Header().Set("Content-Type", "text/event-stream")
			w.Header().Set("Cache-Control", "no-cache")
			w.WriteHeader(http.StatusOK)
			started = true
			if chat {
				return event(chunk("", true, nil))
			}
			return nil
		},
		Token: func(t Token) error {
			if t.Text == "" {
				return nil
			}
			return event(chunk(t.Text, false, nil))
		},
		// Server-sent events cannot take text back.
		Rewind: func(keep, _ int) error {
			return fmt.Errorf("an expert result behind the streamed text after token %d was found wrong by a later check; "+
				"the stream cannot take it back: send the request again (or without \"stream\")", keep)
		},
	})
	if err != nil {
		if !started {
			writeGenError(w, err)
			return
		}
		a.log.Debug("stream ended by error", "err", err)
		_ = event(map[string]apiError{"error": {Message: err.Error(), Type: "server_error"}})
		return
	}
	if !started { // nothing generated cannot happen: Start runs before the first token
		w.Header().Set("Content-Type", "text/event-stream")
		w.WriteHeader(http.StatusOK)
	}
	fr := finishReason(res.Reason)
	last := chunk(res.Rest, false, &fr)
	last["usage"] = usage{res.PromptTokens, len(res.Tokens), res.PromptTokens + len(res.Tokens)}
	if event(last) == nil {
		_, _ = io.WriteString(w, "data: [DONE]\n\n")
		if flusher != nil {
			flusher.Flush()
		}
	}
}
