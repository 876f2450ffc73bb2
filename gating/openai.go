package gating

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"math"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/ipfs/go-cid"

	"github.com/neuro-p2p/neuro/billing"
	"github.com/neuro-p2p/neuro/neuropb"
)

// maxHTTPBody bounds an HTTP API request body, and bodyTimeout the time
// to read it.
const (
	maxHTTPBody = 1 << 20
	bodyTimeout = 30 * time.Second
)

// HTTPOptions configure the HTTP API.
type HTTPOptions struct {
	Log *slog.Logger
	// Auth, if set, authorizes every /v1/ request before its body is
	// read, and says who pays for it.
	Auth HTTPAuth
	// Price, if set, is the ledger's price of one MFLOP of expert work in
	// base units (false: unknown), for /v1/models.
	Price func() (uint64, bool)
}

// HTTPAuth authorizes requests to the HTTP API.
type HTTPAuth interface {
	// Authorize checks r's credentials before its body is read: the Bill
	// that pays for it (nil: it runs unpaid), or the refusal to answer.
	Authorize(r *http.Request) (Bill, *billing.Refusal)
}

// HTTPHandler serves the OpenAI-compatible API of a gating node:
// GET /v1/models, POST /v1/completions and POST /v1/chat/completions,
// with and without streaming (server-sent events). Models are named by
// their CID; a request that names none uses the only model served, if
// there is one. Errors have OpenAI's shape:
// {"error": {"message", "type", "param", "code"}}.
func HTTPHandler(e *Engine, o HTTPOptions) http.Handler {
	log := o.Log
	if log == nil {
		log = slog.Default()
	}
	a := &httpAPI{e: e, log: log.With("component", "http-api"), created: time.Now().Unix(), o: o}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /v1/models", a.authorized(a.models))
	mux.HandleFunc("GET /v1/models/{id}", a.authorized(a.model))
	mux.HandleFunc("POST /v1/completions", a.authorized(a.completions))
	mux.HandleFunc("POST /v1/chat/completions", a.authorized(a.chat))
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

type billKey struct{}

// authorized runs h once Auth lets the request through, with its Bill.
func (a *httpAPI) authorized(h func(http.ResponseWriter, *http.Request)) func(http.ResponseWriter, *http.Request) {
	if a.o.Auth == nil {
		return h
	}
	return func(w http.ResponseWriter, r *http.Request) {
		bill, herr := a.o.Auth.Authorize(r)
		if herr != nil {
			if herr.RetryAfter > 0 {
				w.Header().Set("Retry-After", strconv.Itoa(int(math.Ceil(herr.RetryAfter.Seconds()))))
			}
			if herr.Authenticate {
				w.Header().Set("WWW-Authenticate", `Bearer realm="neuro"`)
			}
			writeError(w, herr.Status, herr.Type, herr.Code, herr.Message)
			return
		}
		if bill != nil {
			r = r.WithContext(context.WithValue(r.Context(), billKey{}, bill))
		}
		h(w, r)
	}
}

func billOf(r *http.Request) Bill {
	b, _ := r.Context().Value(billKey{}).(Bill)
	return b
}

type httpAPI struct {
	e       *Engine
	log     *slog.Logger
	created int64
	o       HTTPOptions
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
	case neuropb.InferError_CODE_PAYMENT_REQUIRED:
		writeError(w, http.StatusPaymentRequired, "insufficient_quota", "insufficient_quota", ge.Msg)
	default:
		writeError(w, http.StatusInternalServerError, "server_error", "", ge.Msg)
	}
}

type modelObject struct {
	ID      string `json:"id"`
	Object  string `json:"object"`
	Created int64  `json:"created"`
	OwnedBy string `json:"owned_by"`
	// Ready and ContextLength are neuro's additions, and the price: what
	// 1,000 tokens (prompt or generated) cost in NEURO at the ledger's
	// price, and the expert work of one token (absent when unknown).
	// Ready: the gating part is loaded; MinProviders: the fewest live
	// providers any of its experts has (0 while some expert has none yet:
	// a request then answers 503 no_provider).
	Ready            bool     `json:"ready"`
	MinProviders     int      `json:"min_providers"`
	ContextLength    int      `json:"context_length,omitempty"`
	PricePer1kTokens *float64 `json:"price_per_1k_tokens,omitempty"`
	FLOPsPerToken    uint64   `json:"flops_per_token,omitempty"`
}

func (a *httpAPI) modelObjects() []modelObject {
	out := []modelObject{}
	for _, m := range a.e.Models() {
		mo := modelObject{ID: m.CID.String(), Object: "model", Created: a.created, OwnedBy: "neuro",
			Ready: m.Ready, ContextLength: m.Context, MinProviders: max(m.MinProviders, 0)}
		if fpt, ok := a.e.FLOPsPerToken(m.CID); ok {
			mo.FLOPsPerToken = fpt
			if a.o.Price != nil {
				if price, ok := a.o.Price(); ok {
					v := float64(billing.PerThousand(fpt, price)) / 1e6
					mo.PricePer1kTokens = &v
				}
			}
		}
		out = append(out, mo)
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
	// ReasoningFormat is llama.cpp server's: "none" returns the answer
	// as the model wrote it; "auto" (the default) or "deepseek" put the
	// reasoning in reasoning_content.
	ReasoningFormat *string `json:"reasoning_format"`
	Messages        []struct {
		Role    string          `json:"role"`
		Content json.RawMessage `json:"content"`
	} `json:"messages"`
}

// readBody reads a request body of at most maxHTTPBody bytes, answering
// the error itself.
func readBody(w http.ResponseWriter, r *http.Request) ([]byte, bool) {
	// The body within bodyTimeout; the deadline is lifted after, so that
	// it never cuts the generation that follows.
	rc := http.NewResponseController(w)
	_ = rc.SetReadDeadline(time.Now().Add(bodyTimeout))
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxHTTPBody))
	_ = rc.SetReadDeadline(time.Time{})
	if err != nil {
		var mb *http.MaxBytesError
		if errors.As(err, &mb) {
			writeError(w, http.StatusRequestEntityTooLarge, "invalid_request_error", "", fmt.Sprintf("request body over %d bytes", mb.Limit))
			return nil, false
		}
		writeError(w, http.StatusBadRequest, "invalid_request_error", "", "read request body: "+err.Error())
		return nil, false
	}
	return body, true
}

// requestError is a bad request body: the parameter at fault ("" for the
// body as a whole) and why.
type requestError struct {
	param string
	err   error
}

func (e *requestError) Error() string { return e.err.Error() }

func badParam(param string, err error) *requestError { return &requestError{param: param, err: err} }

// parseCompletion reads a /v1/completions body into the engine's request;
// only is the model of a request that names none (cid.Undef: it must name
// one).
func parseCompletion(body []byte, only cid.Cid) (*neuropb.InferRequest, *completionRequest, *requestError) {
	if rerr := checkParams(body, completionParams); rerr != nil {
		return nil, nil, rerr
	}
	var req completionRequest
	if err := json.Unmarshal(body, &req); err != nil {
		return nil, nil, badParam("", fmt.Errorf("malformed JSON body: %w", err))
	}
	ir, rerr := request(req.common, only)
	if rerr != nil {
		return nil, nil, rerr
	}
	if req.Prompt == nil || len(*req.Prompt) != 1 {
		return nil, nil, badParam("prompt", errors.New("prompt must be one string"))
	}
	ir.Prompt = (*req.Prompt)[0]
	if ir.Prompt == "" {
		return nil, nil, badParam("prompt", errors.New("prompt is empty"))
	}
	if err := ir.Validate(); err != nil { // the limits of the infer protocol (stop strings, sizes)
		return nil, nil, badParam("", err)
	}
	return ir, &req, nil
}

// parseChat reads a /v1/chat/completions body into the engine's request.
func parseChat(body []byte, only cid.Cid) (*neuropb.InferRequest, *chatRequest, *requestError) {
	if rerr := checkParams(body, chatParams); rerr != nil {
		return nil, nil, rerr
	}
	var req chatRequest
	if err := json.Unmarshal(body, &req); err != nil {
		return nil, nil, badParam("", fmt.Errorf("malformed JSON body: %w", err))
	}
	ir, rerr := request(req.common, only)
	if rerr != nil {
		return nil, nil, rerr
	}
	if len(req.Messages) == 0 {
		return nil, nil, badParam("messages", errors.New("messages is empty"))
	}
	if f := req.ReasoningFormat; f != nil && *f != "none" && *f != "auto" && *f != "deepseek" {
		return nil, nil, badParam("reasoning_format", fmt.Errorf("%q: want none, auto or deepseek", *f))
	}
	for i, m := range req.Messages {
		content, err := messageText(m.Content)
		if err != nil {
			return nil, nil, badParam(fmt.Sprintf("messages[%d].content", i), err)
		}
		ir.Messages = append(ir.Messages, &neuropb.ChatMessage{Role: m.Role, Content: content})
	}
	if err := ir.Validate(); err != nil { // the limits of the infer protocol (roles, sizes)
		return nil, nil, badParam("", err)
	}
	return ir, &req, nil
}

// A param is how a request body's field is taken: implemented, or known
// to OpenAI's API but not implemented here, in which case only its
// neutral value (the one that asks for nothing) is accepted.
type param struct {
	implemented bool
	// neutral reports whether a value of an unimplemented parameter asks
	// for nothing (null, false, 0, empty).
	neutral func(json.RawMessage) bool
}

var (
	implemented = param{implemented: true}
	// unimplemented parameters whose null, false, 0, "" or empty value
	// asks for nothing.
	inert = param{neutral: func(v json.RawMessage) bool {
		switch t := strings.TrimSpace(string(v)); t {
		case "null", "false", "0", "0.0", `""`, "[]", "{}":
			return true
		}
		return false
	}}
	commonParams = map[string]param{
		"model": implemented, "max_tokens": implemented, "max_completion_tokens": implemented, "temperature": implemented,
		"top_p": implemented, "top_k": implemented, "seed": implemented, "stop": implemented, "stream": implemented,
		"n": implemented, "user": implemented, "stream_options": implemented,
		"logprobs": inert, "top_logprobs": inert, "logit_bias": inert, "presence_penalty": inert,
		"frequency_penalty": inert, "tools": inert, "functions": inert, "tool_choice": {neutral: func(v json.RawMessage) bool {
			t := strings.TrimSpace(string(v))
			return t == "null" || t == `"none"`
		}}, "parallel_tool_calls": inert, "function_call": inert, "store": inert, "metadata": inert,
		"response_format": {neutral: func(v json.RawMessage) bool {
			var rf struct {
				Type string `json:"type"`
			}
			return strings.TrimSpace(string(v)) == "null" || (json.Unmarshal(v, &rf) == nil && rf.Type == "text")
		}},
	}
	completionParams = withParams(commonParams, map[string]param{"prompt": implemented, "echo": inert, "suffix": inert,
		"best_of": {neutral: func(v json.RawMessage) bool {
			t := strings.TrimSpace(string(v))
			return t == "null" || t == "1"
		}}})
	chatParams = withParams(commonParams, map[string]param{"messages": implemented, "reasoning_format": implemented})
)

func withParams(a, b map[string]param) map[string]param {
	out := make(map[string]param, len(a)+len(b))
	maps.Copy(out, a)
	maps.Copy(out, b)
	return out
}

// checkParams refuses a body with a field this API does not know, or one
// it knows but does not implement set to anything but its neutral value:
// a client never gets a silent no for what it asked.
func checkParams(body []byte, known map[string]param) *requestError {
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(body, &fields); err != nil {
		return badParam("", fmt.Errorf("malformed JSON body: %w", err))
	}
	for _, name := range slices.Sorted(maps.Keys(fields)) {
		p, ok := known[name]
		switch {
		case !ok:
			return badParam(name, fmt.Errorf("unknown parameter %q", name))
		case !p.implemented && !p.neutral(fields[name]):
			return badParam(name, fmt.Errorf("parameter %q is not supported by this server", name))
		}
	}
	return nil
}

// onlyModel is the model a request that names none gets: the one model
// served, or none when there are several.
func (a *httpAPI) onlyModel() cid.Cid {
	if ms := a.e.Models(); len(ms) == 1 {
		return ms[0].CID
	}
	return cid.Undef
}

// request builds the engine's request from the common fields.
func request(c common, only cid.Cid) (*neuropb.InferRequest, *requestError) {
	if c.N != nil && *c.N != 1 {
		return nil, badParam("n", fmt.Errorf("n = %d: only one choice per request is supported", *c.N))
	}
	model := c.Model
	if model == "" {
		if !only.Defined() {
			return nil, badParam("model", errors.New("model is required (GET /v1/models lists them)"))
		}
		model = only.String()
	}
	mc, err := cid.Decode(model)
	if err != nil {
		return nil, badParam("model", fmt.Errorf("model %q is not a CID (GET /v1/models lists the models served)", model))
	}
	s := &neuropb.Sampling{Stop: c.Stop, Temperature: 1}
	if c.Temperature != nil {
		// OpenAI's range.
		if t := *c.Temperature; t != t || t < 0 || t > 2 {
			return nil, badParam("temperature", fmt.Errorf("temperature %v: want 0 to 2", t))
		}
		s.Temperature = *c.Temperature
	}
	if c.TopP != nil {
		if p := *c.TopP; p != p || p < 0 || p > 1 {
			return nil, badParam("top_p", fmt.Errorf("top_p %v: want 0 to 1", p))
		}
		s.TopP = *c.TopP
	}
	if c.TopK != nil {
		if *c.TopK < 0 {
			return nil, badParam("top_k", fmt.Errorf("top_k %d is negative", *c.TopK))
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
			return nil, badParam("max_tokens", fmt.Errorf("max_tokens %d: want 1 to %d", *mt, neuropb.MaxGenerateTokens))
		}
		s.MaxTokens = uint32(*mt)
	}
	return &neuropb.InferRequest{Model: mc.Bytes(), Sampling: s}, nil
}

func (a *httpAPI) completions(w http.ResponseWriter, r *http.Request) {
	body, ok := readBody(w, r)
	if !ok {
		return
	}
	ir, req, rerr := parseCompletion(body, a.onlyModel())
	if rerr != nil {
		writeRequestError(w, rerr)
		return
	}
	a.run(w, r, ir, false, req.Model, req.Stream, ReasoningNone)
}

func (a *httpAPI) chat(w http.ResponseWriter, r *http.Request) {
	body, ok := readBody(w, r)
	if !ok {
		return
	}
	ir, req, rerr := parseChat(body, a.onlyModel())
	if rerr != nil {
		writeRequestError(w, rerr)
		return
	}
	format := ReasoningNone
	if req.ReasoningFormat == nil || *req.ReasoningFormat != "none" {
		c, _ := cid.Cast(ir.GetModel())
		format = a.e.ReasoningFormat(c)
	}
	a.run(w, r, ir, true, req.Model, req.Stream, format)
}

// writeRequestError answers a bad request body: 400 with OpenAI's error
// shape, naming the parameter at fault.
func writeRequestError(w http.ResponseWriter, e *requestError) {
	if e.param == "" {
		writeError(w, http.StatusBadRequest, "invalid_request_error", "", e.Error())
		return
	}
	writeParamError(w, e.param, e.err)
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
	// Cost is what the request was charged, in NEURO (CostBaseUnits in
	// base units), from Escrow (absent: unpaid; a string, since a 64-bit
	// ID does not survive JavaScript's numbers).
	Cost          float64 `json:"cost"`
	CostBaseUnits uint64  `json:"cost_base_units"`
	Escrow        uint64  `json:"escrow,omitempty,string"`
}

func usageOf(res *Result) usage {
	return usage{PromptTokens: res.PromptTokens, CompletionTokens: len(res.Tokens), TotalTokens: res.PromptTokens + len(res.Tokens),
		Cost: float64(res.Cost) / 1e6, CostBaseUnits: res.Cost, Escrow: res.Escrow}
}

// run generates and answers, as one JSON object or as server-sent events.
// run answers a request; a chat's answer is split into reasoning_content
// and content as format says.
func (a *httpAPI) run(w http.ResponseWriter, r *http.Request, ir *neuropb.InferRequest, chat bool, model string, stream bool, format string) {
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
		res, err := a.e.Generate(r.Context(), ir, Callbacks{Bill: billOf(r)})
		if err != nil {
			writeGenError(w, err)
			return
		}
		choice := map[string]any{"index": 0, "finish_reason": finishReason(res.Reason), "logprobs": nil}
		if chat {
			reasoning, content := splitReasoning(format, false, res.Text)
			msg := map[string]string{"role": "assistant", "content": content}
			if reasoning = strings.TrimSpace(reasoning); reasoning != "" {
				msg["reasoning_content"] = reasoning
			}
			choice["message"] = msg
		} else {
			choice["text"] = res.Text
		}
		writeJSON(w, http.StatusOK, map[string]any{"id": id, "object": object, "created": created, "model": model,
			"choices": []any{choice},
			"usage":   usageOf(res)})
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
	split := newReasoningSplitter(format, false)
	// chunk is the event of one delta; held reports a chat delta that the
	// splitter holds back whole (a marker may be starting): no event.
	chunk := func(delta string, first bool, finish *string) (_ map[string]any, held bool) {
		choice := map[string]any{"index": 0, "finish_reason": finish, "logprobs": nil}
		if chat {
			d := map[string]string{}
			if first {
				d["role"] = "assistant"
			}
			reasoning, content := split.Push(delta)
			if finish != nil {
				r2, c2 := split.Flush()
				reasoning, content = reasoning+r2, content+c2
			}
			if reasoning != "" {
				d["reasoning_content"] = reasoning
			}
			if content != "" || (!first && reasoning == "") {
				d["content"] = content
			}
			choice["delta"] = d
			held = !first && finish == nil && reasoning == "" && content == ""
		} else {
			choice["text"] = delta
		}
		return map[string]any{"id": id, "object": chunkObject, "created": created, "model": model, "choices": []any{choice}}, held
	}
	res, err := a.e.Generate(r.Context(), ir, Callbacks{
		Bill: billOf(r),
		// Headers go out once the prompt is accepted, so that a refused
		// request still gets an HTTP error status.
		Start: func(int, time.Duration) error {
			w.Header().Set("Content-Type", "text/event-stream")
			w.Header().Set("Cache-Control", "no-cache")
			w.WriteHeader(http.StatusOK)
			started = true
			if chat {
				c, _ := chunk("", true, nil)
				return event(c)
			}
			return nil
		},
		Token: func(t Token) error {
			if t.Text == "" {
				return nil
			}
			c, held := chunk(t.Text, false, nil)
			if held {
				return nil
			}
			return event(c)
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
	last, _ := chunk(res.Rest, false, &fr)
	last["usage"] = usageOf(res)
	if event(last) == nil {
		_, _ = io.WriteString(w, "data: [DONE]\n\n")
		if flusher != nil {
			flusher.Flush()
		}
	}
}
