package neuropb

import "github.com/libp2p/go-libp2p/core/protocol"

// DHTPrefix is the protocol prefix of neuro's Kademlia DHT. It keeps a neuro
// node off the public IPFS (Amino) DHT: its protocol is /neuro/kad/1.0.0.
const DHTPrefix protocol.ID = "/neuro"

// GossipSub topics. Each topic has one message type and one validator.
const (
	// TopicRouting carries Heartbeat messages.
	TopicRouting = "/neuro/routing/1.0.0"
	// TopicValidation carries validation verdicts (trust issue).
	TopicValidation = "/neuro/validation/1.0.0"
	// TopicLedger carries signed ledger transactions (ledger issue).
	TopicLedger = "/neuro/ledger/1.0.0"
)

// Size limits. A message over its limit is rejected before it is decoded.
const (
	// MaxGossipRPCSize bounds one GossipSub RPC frame (all topics). Larger
	// frames make pubsub reset the stream.
	MaxGossipRPCSize = 1 << 20
	// MaxHeartbeatSize bounds one encoded Heartbeat (hosted expert lists
	// included).
	MaxHeartbeatSize = 64 << 10
	// MaxHostedModels and MaxHostedExperts bound Heartbeat.hosted.
	MaxHostedModels  = 16
	MaxHostedExperts = 16384
	// MaxHostedSpans bounds HostedModel.spans.
	MaxHostedSpans = 16

	// MaxHeartbeatAddrs bounds Heartbeat.addrs; MaxAddrLen one address.
	MaxHeartbeatAddrs = 32
	MaxAddrLen        = 256
	// MaxHeartbeatIntervalMs bounds Heartbeat.interval_ms (an hour): a
	// peer cannot make the others remember it for longer than a few.
	MaxHeartbeatIntervalMs = 3600_000
	// MaxRoles bounds Heartbeat.roles; MaxVersionLen Heartbeat.version.
	MaxRoles      = 8
	MaxVersionLen = 64
)

// MaxManifestSize bounds an encoded Manifest (a model with thousands of
// experts fits in well under a megabyte).
const MaxManifestSize = 16 << 20

// ExpertProtocol is the stream protocol of expert compute: 1.2.0 is
// 1.1.0 (ExpertProtocol11) with a group's rows sent once
// (ExpertRequest.group_rows), and 1.1.0 is 1.0.0 (ExpertProtocol10) with
// request groups (ExpertRequest.group). A node serves all three; a caller
// asks for the newest first and uses groups, and shared rows, only on a
// stream that speaks them, so that a node of an older version is never
// sent a message it would misread.
const (
	ExpertProtocol   protocol.ID = "/neuro/expert/1.2.0"
	ExpertProtocol11 protocol.ID = "/neuro/expert/1.1.0"
	ExpertProtocol10 protocol.ID = "/neuro/expert/1.0.0"
)

// ExpertService is the resource-manager service of expert streams.
const ExpertService = "neuro.expert"

// Expert protocol limits.
const (
	// MaxExpertMessageSize bounds one ExpertRequest or ExpertResponse:
	// 512 tokens of a 8192-wide hidden state in F32, plus headroom.
	MaxExpertMessageSize = 17 << 20
	// MaxExpertTokens bounds the tokens of one request.
	MaxExpertTokens = 512
	// MaxDelegations bounds the escrow delegations of one request.
	MaxDelegations = 16
	// MaxEmbd bounds the hidden size.
	MaxEmbd = 65536
)

// SpanProtocol is the stream protocol of layer spans: a head sends the
// hidden states entering a run of layers to the node that hosts it.
const SpanProtocol protocol.ID = "/neuro/span/1.0.0"

// SpanService is the resource-manager service of span streams.
const SpanService = "neuro.span"

// Span protocol limits: a request carries at most MaxExpertTokens rows of
// at most MaxEmbd floats, like an expert request.
const (
	MaxSpanMessageSize = MaxExpertMessageSize
	// SessionIDLen is the length of a head's session name.
	SessionIDLen = 16
)

// ShardProtocol is the stream protocol that moves shards and manifests.
const ShardProtocol protocol.ID = "/neuro/shard/1.0.0"

// ShardService is the resource-manager service of shard streams.
const ShardService = "neuro.shard"

// MaxShardHeaderSize bounds a ShardRequest or ShardResponse.
const MaxShardHeaderSize = 4 << 10

// MaxBlobSize bounds one blob: an expert of the largest MoE models in F16
// is a few GiB.
const MaxBlobSize = 16 << 30

// InferProtocol is the stream protocol between a client and a gating
// node.
const InferProtocol protocol.ID = "/neuro/infer/1.0.0"

// InferService is the resource-manager service of infer streams.
const InferService = "neuro.infer"

// Infer protocol limits.
const (
	// MaxInferRequestSize bounds one InferRequest; MaxInferResponseSize
	// one InferResponse (a done message carries the whole text).
	MaxInferRequestSize  = 1 << 20
	MaxInferResponseSize = 1 << 20
	// MaxChatMessages bounds InferRequest.messages.
	MaxChatMessages = 1024
	// MaxStopStrings and MaxStopLen bound Sampling.stop.
	MaxStopStrings = 8
	MaxStopLen     = 256
	// MaxGenerateTokens bounds Sampling.max_tokens.
	MaxGenerateTokens = 1 << 16
)

// MaxVerdictSize bounds an encoded Verdict: four tensors of up to
// MaxVerdictFloats floats each (the input, two outputs, and a span
// verdict's history), plus headroom.
const (
	MaxVerdictFloats = 16384
	MaxVerdictSize   = 4*4*MaxVerdictFloats + 4<<10
)

// MaxLedgerTxSize bounds one ledger transaction (a settlement of many
// receipts, or a slash with its verdict).
const MaxLedgerTxSize = MaxVerdictSize + 64<<10

// MaxReceipts bounds the receipts of one settlement.
const MaxReceipts = 256

// LedgerQueryProtocol is the stream protocol of ledger queries to
// validators.
const LedgerQueryProtocol protocol.ID = "/neuro/ledger/query/1.0.0"

// MaxLedgerQuerySize bounds a LedgerQuery or LedgerStatus (with its
// proof: a header, a commit and Merkle leaves).
const MaxLedgerQuerySize = 1 << 20
