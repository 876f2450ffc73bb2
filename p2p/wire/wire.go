// Package wire frames protobuf messages on libp2p streams: an unsigned
// varint length, then the message, with a size limit per read. A frame
// over the limit is skipped, not parsed, so that a request-reply protocol
// can answer "too large" and go on using the stream.
package wire

import (
	"bufio"
	"errors"
	"fmt"
	"io"

	"google.golang.org/protobuf/encoding/protodelim"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
)

// MaxSkip bounds how many bytes of one oversized frame Reader skips; a
// frame claiming more ends the stream.
const MaxSkip = 1 << 30

// TooLargeError reports a frame over the limit. When Skipped is true the
// frame was read past and the stream is still in sync.
type TooLargeError struct {
	Size, Max uint64
	Skipped   bool
}

func (e *TooLargeError) Error() string {
	return fmt.Sprintf("message of %d bytes exceeds the limit of %d", e.Size, e.Max)
}

// Reader reads length-prefixed messages from one stream. Use one Reader
// per stream for its whole life: it buffers.
type Reader struct {
	r   *bufio.Reader
	max int
}

// NewReader reads from r, refusing messages over max bytes.
func NewReader(r io.Reader, max int) *Reader {
	return &Reader{r: bufio.NewReaderSize(r, 64<<10), max: max}
}

// Read reads the next message into m. A *TooLargeError with Skipped set
// leaves the stream usable; any other error ends it.
func (r *Reader) Read(m proto.Message) error {
	err := protodelim.UnmarshalOptions{MaxSize: int64(r.max)}.UnmarshalFrom(r.r, m)
	var tl *protodelim.SizeTooLargeError
	if errors.As(err, &tl) {
		e := &TooLargeError{Size: tl.Size, Max: uint64(r.max)}
		if tl.Size <= MaxSkip {
			if _, err := io.CopyN(io.Discard, r.r, int64(tl.Size)); err != nil {
				return fmt.Errorf("skip oversized message: %w", err)
			}
			e.Skipped = true
		}
		return e
	}
	return err
}

// Writer writes length-prefixed messages to one stream, each in one
// write, from a buffer it keeps (a message's frame is not allocated
// anew). Like the stream, it is not safe for concurrent writes.
type Writer struct {
	w   io.Writer
	max int
	buf []byte
}

// keepBuf bounds the buffer a Writer keeps between messages: a larger
// message's is dropped after it is written.
const keepBuf = 1 << 20

// NewWriter writes to w, refusing to send messages over max bytes.
func NewWriter(w io.Writer, max int) *Writer {
	return &Writer{w: w, max: max}
}

// Write sends m.
func (w *Writer) Write(m proto.Message) error {
	size := proto.Size(m)
	if size > w.max {
		return &TooLargeError{Size: uint64(size), Max: uint64(w.max)}
	}
	buf := protowire.AppendVarint(w.buf[:0], uint64(size))
	buf, err := proto.MarshalOptions{UseCachedSize: true}.MarshalAppend(buf, m)
	if err != nil {
		return err
	}
	if cap(buf) <= keepBuf {
		w.buf = buf
	} else {
		w.buf = nil
	}
	_, err = w.w.Write(buf)
	return err
}

// Raw returns the reader under the framing, for a protocol whose framed
// header is followed by raw bytes; it holds whatever Read buffered.
func (r *Reader) Raw() io.Reader { return r.r }
