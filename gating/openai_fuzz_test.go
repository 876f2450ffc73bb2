package gating

import (
	"encoding/json"
	"testing"

	"github.com/ipfs/go-cid"
	"github.com/multiformats/go-multihash"
	"google.golang.org/protobuf/proto"

	"github.com/neuro-p2p/neuro/neuropb"
)

// openAIBody writes an engine request back as the OpenAI JSON body that
// asks for it (chat when it has messages).
func openAIBody(t *testing.T, ir *neuropb.InferRequest) []byte {
	t.Helper()
	mc, err := cid.Cast(ir.GetModel())
	if err != nil {
		t.Fatal(err)
	}
	s := ir.GetSampling()
	m := map[string]any{"model": mc.String(), "temperature": s.GetTemperature(), "top_p": s.GetTopP(), "top_k": s.GetTopK()}
	if len(s.GetStop()) > 0 {
		m["stop"] = s.GetStop()
	}
	if s.Seed != nil {
		m["seed"] = int64(s.GetSeed())
	}
	if s.GetMaxTokens() > 0 {
		m["max_tokens"] = s.GetMaxTokens()
	}
	if len(ir.GetMessages()) > 0 {
		var msgs []map[string]string
		for _, x := range ir.GetMessages() {
			msgs = append(msgs, map[string]string{"role": x.GetRole(), "content": x.GetContent()})
		}
		m["messages"] = msgs
	} else {
		m["prompt"] = ir.GetPrompt()
	}
	b, err := json.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// FuzzOpenAIBodies reads any bytes as a /v1/completions and a
// /v1/chat/completions body. Properties: a request is either refused with
// a parameter error or accepted as a request the infer protocol accepts
// (Validate); and an accepted one, written back as JSON, reads back to the
// same request.
func FuzzOpenAIBodies(f *testing.F) {
	mh, _ := multihash.Sum([]byte("m"), multihash.SHA2_256, -1)
	only := cid.NewCidV1(cid.Raw, mh)
	for _, seed := range []string{
		`{"prompt":"once upon a time","max_tokens":8,"temperature":0,"seed":3,"stop":["\n"]}`,
		`{"model":"` + only.String() + `","prompt":["a"],"top_k":40,"top_p":0.9}`,
		`{"messages":[{"role":"system","content":"be brief"},{"role":"user","content":[{"type":"text","text":"hi"}]}],"max_completion_tokens":4}`,
		`{"messages":[],"n":2}`, `{"prompt":"x","max_tokens":0}`, `{"prompt":""}`, `{"model":"nope","prompt":"x"}`, `[`, `null`,
		`{"prompt":"x","logprobs":false,"user":"u","response_format":{"type":"text"},"temperature":2}`,
		`{"prompt":"x","logprobs":true}`, `{"prompt":"x","unknown":1}`, `{"prompt":"x","temperature":2.5}`,
	} {
		f.Add([]byte(seed))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		type parser func([]byte, cid.Cid) (*neuropb.InferRequest, *requestError)
		completion := func(b []byte, c cid.Cid) (*neuropb.InferRequest, *requestError) {
			ir, _, err := parseCompletion(b, c)
			return ir, err
		}
		chat := func(b []byte, c cid.Cid) (*neuropb.InferRequest, *requestError) {
			ir, _, err := parseChat(b, c)
			return ir, err
		}
		for _, parse := range []parser{completion, chat} {
			ir, rerr := parse(body, only)
			if rerr != nil {
				if rerr.err == nil || rerr.Error() == "" {
					t.Fatalf("a refusal without a reason: %+v", rerr)
				}
				continue
			}
			if err := ir.Validate(); err != nil {
				t.Fatalf("accepted %q as a request the protocol refuses: %v", body, err)
			}
			again, rerr := parse(openAIBody(t, ir), cid.Undef)
			if rerr != nil {
				t.Fatalf("the request written back is refused: %v", rerr)
			}
			if !proto.Equal(ir, again) {
				t.Fatalf("parse -> write -> parse is not stable:\n%v\n%v", ir, again)
			}
		}
	})
}
