package node

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"time"

	"github.com/libp2p/go-libp2p/core/peer"

	"github.com/neuro-p2p/neuro/billing"
)

// APIKeysPath is the control API's endpoint for a gating node's API keys:
// GET lists them, POST an APIKeyRequest creates one; POST to
// APIKeysPath+"/revoke" with {"id": ...} revokes one.
const APIKeysPath = "/api/v1/apikeys"

// APIKeyRequest asks for a new key.
type APIKeyRequest struct {
	// Account is the ledger account (peer ID) that pays for the key's
	// requests; it must allow this gating node to draw on it.
	Account string `json:"account"`
	// Budget is the most the key may spend, in base units.
	Budget uint64 `json:"budget"`
	// RatePerMin is the most requests a minute (0: no limit).
	RatePerMin int `json:"rate_per_min"`
}

// APIKeyInfo is one key as listed (never the key itself).
type APIKeyInfo struct {
	ID         string    `json:"id"`
	Account    string    `json:"account"`
	Budget     uint64    `json:"budget"`
	Spent      uint64    `json:"spent"`
	Left       uint64    `json:"left"`
	RatePerMin int       `json:"rate_per_min"`
	Requests   uint64    `json:"requests"`
	Created    time.Time `json:"created"`
	Revoked    bool      `json:"revoked"`
	// Key is the key itself: only in the answer to its creation.
	Key string `json:"key,omitempty"`
}

// KeyInfo describes k.
func KeyInfo(k billing.Key) APIKeyInfo {
	return APIKeyInfo{ID: k.ID, Account: k.Account, Budget: k.Budget, Spent: k.Spent, Left: k.Left(), RatePerMin: k.RatePerMin,
		Requests: k.Requests, Created: k.Created, Revoked: k.Revoked}
}

// CreateKey checks req and issues a key from store.
func CreateKey(store *billing.Store, req APIKeyRequest) (APIKeyInfo, error) {
	account, err := peer.Decode(req.Account)
	if err != nil {
		return APIKeyInfo{}, fmt.Errorf("account %q: %w", req.Account, err)
	}
	secret, k, err := store.Create(account, req.Budget, req.RatePerMin)
	if err != nil {
		return APIKeyInfo{}, err
	}
	info := KeyInfo(k)
	info.Key = secret
	return info, nil
}

func (n *Node) serveAPIKeys(w http.ResponseWriter, r *http.Request) {
	reply := func(status int, v any) {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(status)
		_ = json.NewEncoder(w).Encode(v)
	}
	fail := func(status int, err error) { reply(status, map[string]string{"error": err.Error()}) }
	if n.pay == nil || n.pay.keys == nil {
		fail(http.StatusConflict, errors.New("API keys are a gating node's (set gating.enabled)"))
		return
	}
	keys := n.pay.keys
	switch {
	case r.Method == http.MethodGet && r.URL.Path == APIKeysPath:
		out := []APIKeyInfo{}
		for _, k := range keys.List() {
			out = append(out, KeyInfo(k))
		}
		reply(http.StatusOK, out)
	case r.Method == http.MethodPost && r.URL.Path == APIKeysPath:
		if n.ledger == nil {
			fail(http.StatusConflict, errors.New("this node takes no part in a ledger (set ledger.genesis): its keys could not be charged"))
			return
		}
		var req APIKeyRequest
		if err := json.NewDecoder(io.LimitReader(r.Body, 64<<10)).Decode(&req); err != nil {
			fail(http.StatusBadRequest, fmt.Errorf("request: %w", err))
			return
		}
		info, err := CreateKey(keys, req)
		if err != nil {
			fail(http.StatusBadRequest, err)
			return
		}
		n.log.Info("API key created", "id", info.ID, "account", info.Account, "budget", info.Budget, "rate_per_min", info.RatePerMin)
		reply(http.StatusOK, info)
	case r.Method == http.MethodPost && r.URL.Path == APIKeysPath+"/revoke":
		var req struct {
			ID string `json:"id"`
		}
		if err := json.NewDecoder(io.LimitReader(r.Body, 64<<10)).Decode(&req); err != nil {
			fail(http.StatusBadRequest, fmt.Errorf("request: %w", err))
			return
		}
		k, err := keys.Revoke(req.ID)
		if err != nil {
			status := http.StatusInternalServerError
			if errors.Is(err, billing.ErrUnknownID) {
				status = http.StatusNotFound
			}
			fail(status, err)
			return
		}
		n.log.Info("API key revoked", "id", k.ID)
		reply(http.StatusOK, KeyInfo(k))
	default:
		fail(http.StatusMethodNotAllowed, fmt.Errorf("%s %s: want GET or POST %s, or POST %s/revoke", r.Method, r.URL.Path, APIKeysPath, APIKeysPath))
	}
}

// ListAPIKeys asks the node at addr for its API keys.
func ListAPIKeys(ctx context.Context, addr string) ([]APIKeyInfo, error) {
	var out []APIKeyInfo
	if err := apiCall(ctx, addr, http.MethodGet, APIKeysPath, nil, &out); err != nil {
		return nil, fmt.Errorf("api keys: %w", err)
	}
	return out, nil
}

// CreateAPIKey asks the node at addr for a new key.
func CreateAPIKey(ctx context.Context, addr string, req APIKeyRequest) (APIKeyInfo, error) {
	body, _ := json.Marshal(req)
	var out APIKeyInfo
	if err := apiCall(ctx, addr, http.MethodPost, APIKeysPath, body, &out); err != nil {
		return APIKeyInfo{}, fmt.Errorf("api keys: %w", err)
	}
	return out, nil
}

// RevokeAPIKey asks the node at addr to revoke key id.
func RevokeAPIKey(ctx context.Context, addr, id string) (APIKeyInfo, error) {
	body, _ := json.Marshal(map[string]string{"id": id})
	var out APIKeyInfo
	if err := apiCall(ctx, addr, http.MethodPost, APIKeysPath+"/revoke", body, &out); err != nil {
		return APIKeyInfo{}, fmt.Errorf("api keys: %w", err)
	}
	return out, nil
}
