package model

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
)

// GGUF constants (GGUF v3, little-endian).
const (
	ggufMagic        = 0x46554747 // "GGUF"
	ggufVersion      = 3
	DefaultAlignment = 32

	// Bounds a file must respect; they are far above any real model's.
	maxKVs        = 1 << 16
	maxTensors    = 1 << 20
	maxKeyLen     = 1 << 16
	maxStringLen  = 1 << 24
	maxDims       = 4
	maxNameLen    = 64 << 10
	maxArrayDepth = 1 // arrays of arrays are not used by llama.cpp models
)

// ErrFormat is wrapped by every error about a malformed GGUF file.
var ErrFormat = errors.New("malformed GGUF")

// GGUF value types.
const (
	typeUint8   uint32 = 0
	typeInt8    uint32 = 1
	typeUint16  uint32 = 2
	typeInt16   uint32 = 3
	typeUint32  uint32 = 4
	typeInt32   uint32 = 5
	typeFloat32 uint32 = 6
	typeBool    uint32 = 7
	typeString  uint32 = 8
	typeArray   uint32 = 9
	typeUint64  uint32 = 10
	typeInt64   uint32 = 11
	typeFloat64 uint32 = 12
)

// KV is one metadata entry. Value is one of uint8, int8, uint16, int16,
// uint32, int32, float32, bool, string, uint64, int64, float64, or a slice
// of one of those.
type KV struct {
	Key   string
	Value any
}

// TensorInfo describes one tensor of a GGUF file.
type TensorInfo struct {
	Name string
	Type DType
	// Shape in ggml order: Shape[0] (ne0) is the contiguous dimension.
	Shape []uint64
	// Offset of the data from the start of the data section.
	Offset uint64
}

// Elements is the number of elements.
func (t TensorInfo) Elements() uint64 {
	n := uint64(1)
	for _, d := range t.Shape {
		n *= d
	}
	return n
}

// Size is the number of bytes of the tensor's data.
func (t TensorInfo) Size() uint64 { return t.Type.RowSize(t.Elements()) }

// File is a parsed GGUF header: metadata, tensor infos and where the data
// starts. Tensor data stays in the file.
type File struct {
	Version   uint32
	KVs       []KV
	Tensors   []TensorInfo
	Alignment uint64
	// DataOffset is the file offset of the data section.
	DataOffset int64
	// Size is the file's size in bytes.
	Size int64
}

// Get returns the value of key, or nil.
func (f *File) Get(key string) any {
	for _, kv := range f.KVs {
		if kv.Key == key {
			return kv.Value
		}
	}
	return nil
}

// Tensor returns the tensor named name.
func (f *File) Tensor(name string) (TensorInfo, bool) {
	for _, t := range f.Tensors {
		if t.Name == name {
			return t, true
		}
	}
	return TensorInfo{}, false
}

// TensorReader returns a reader of t's data in r (the file f was read from).
func (f *File) TensorReader(r io.ReaderAt, t TensorInfo) *io.SectionReader {
	return io.NewSectionReader(r, f.DataOffset+int64(t.Offset), int64(t.Size()))
}

// reader decodes GGUF values and refuses any length beyond the bytes left.
type reader struct {
	r    *bufio.Reader
	pos  int64
	size int64
}

func (r *reader) fail(format string, args ...any) error {
	return fmt.Errorf("%w: at byte %d: %s", ErrFormat, r.pos, fmt.Sprintf(format, args...))
}

func (r *reader) read(p []byte) error {
	if int64(len(p)) > r.size-r.pos {
		return r.fail("need %d bytes, %d left (truncated file?)", len(p), r.size-r.pos)
	}
	n, err := io.ReadFull(r.r, p)
	r.pos += int64(n)
	if err != nil {
		return r.fail("read: %v", err)
	}
	return nil
}

func (r *reader) u8() (uint8, error) {
	var b [1]byte
	err := r.read(b[:])
	return b[0], err
}

func (r *reader) u16() (uint16, error) {
	var b [2]byte
	err := r.read(b[:])
	return binary.LittleEndian.Uint16(b[:]), err
}

func (r *reader) u32() (uint32, error) {
	var b [4]byte
	err := r.read(b[:])
	return binary.LittleEndian.Uint32(b[:]), err
}

func (r *reader) u64() (uint64, error) {
	var b [8]byte
	err := r.read(b[:])
	return binary.LittleEndian.Uint64(b[:]), err
}

// count reads a u64 count of items each at least minSize bytes long and
// refuses counts that cannot fit in the rest of the file or exceed limit.
func (r *reader) count(what string, minSize, limit uint64) (int, error) {
	n, err := r.u64()
	if err != nil {
		return 0, err
	}
	if n > limit {
		return 0, r.fail("%s count %d exceeds the limit %d", what, n, limit)
	}
	if minSize > 0 && n > uint64(r.size-r.pos)/minSize {
		return 0, r.fail("%s count %d cannot fit in the %d bytes left", what, n, r.size-r.pos)
	}
	return int(n), nil
}

func (r *reader) str(limit uint64) (string, error) {
	n, err := r.count("string length", 1, limit)
	if err != nil {
		return "", err
	}
	b := make([]byte, n)
	if err := r.read(b); err != nil {
		return "", err
	}
	return string(b), nil
}

// scalarSize is the encoded size of a scalar GGUF type, 0 for others.
func scalarSize(t uint32) uint64 {
	switch t {
	case typeUint8, typeInt8, typeBool:
		return 1
	case typeUint16, typeInt16:
		return 2
	case typeUint32, typeInt32, typeFloat32:
		return 4
	case typeUint64, typeInt64, typeFloat64:
		return 8
	case typeString:
		return 8 // at least the length
	}
	return 0
}

func (r *reader) value(t uint32, depth int) (any, error) {
	switch t {
	case typeUint8:
		return r.u8()
	case typeInt8:
		v, err := r.u8()
		return int8(v), err
	case typeUint16:
		return r.u16()
	case typeInt16:
		v, err := r.u16()
		return int16(v), err
	case typeUint32:
		return r.u32()
	case typeInt32:
		v, err := r.u32()
		return int32(v), err
	case typeFloat32:
		v, err := r.u32()
		return math.Float32frombits(v), err
	case typeBool:
		v, err := r.u8()
		if err == nil && v > 1 {
			return nil, r.fail("bool value %d", v)
		}
		return v == 1, err
	case typeString:
		return r.str(maxStringLen)
	case typeUint64:
		return r.u64()
	case typeInt64:
		v, err := r.u64()
		return int64(v), err
	case typeFloat64:
		v, err := r.u64()
		return math.Float64frombits(v), err
	case typeArray:
		if depth >= maxArrayDepth {
			return nil, r.fail("nested arrays are not supported")
		}
		et, err := r.u32()
		if err != nil {
			return nil, err
		}
		size := scalarSize(et)
		if size == 0 {
			return nil, r.fail("array of unknown type %d", et)
		}
		n, err := r.count("array length", size, math.MaxInt32)
		if err != nil {
			return nil, err
		}
		return r.array(et, n)
	}
	return nil, r.fail("unknown value type %d", t)
}

func readSlice[T any](r *reader, n int, t uint32) (any, error) {
	out := make([]T, n)
	for i := range out {
		v, err := r.value(t, 1)
		if err != nil {
			return nil, err
		}
		out[i] = v.(T)
	}
	return out, nil
}

func (r *reader) array(t uint32, n int) (any, error) {
	switch t {
	case typeUint8:
		return readSlice[uint8](r, n, t)
	case typeInt8:
		return readSlice[int8](r, n, t)
	case typeUint16:
		return readSlice[uint16](r, n, t)
	case typeInt16:
		return readSlice[int16](r, n, t)
	case typeUint32:
		return readSlice[uint32](r, n, t)
	case typeInt32:
		return readSlice[int32](r, n, t)
	case typeFloat32:
		return readSlice[float32](r, n, t)
	case typeBool:
		return readSlice[bool](r, n, t)
	case typeString:
		return readSlice[string](r, n, t)
	case typeUint64:
		return readSlice[uint64](r, n, t)
	case typeInt64:
		return readSlice[int64](r, n, t)
	case typeFloat64:
		return readSlice[float64](r, n, t)
	}
	return nil, r.fail("array of unknown type %d", t)
}

// ReadFile parses the GGUF header of the size bytes in ra and checks every
// tensor: known dtype, sane shape, data aligned and inside the file.
func ReadFile(ra io.ReaderAt, size int64) (*File, error) {
	r := &reader{r: bufio.NewReaderSize(io.NewSectionReader(ra, 0, size), 64<<10), size: size}
	magic, err := r.u32()
	if err != nil {
		return nil, fmt.Errorf("%w: not a GGUF file (too short)", ErrFormat)
	}
	if magic != ggufMagic {
		return nil, fmt.Errorf("%w: not a GGUF file (magic %#08x)", ErrFormat, magic)
	}
	f := &File{Size: size, Alignment: DefaultAlignment}
	if f.Version, err = r.u32(); err != nil {
		return nil, err
	}
	if f.Version != 2 && f.Version != 3 {
		return nil, fmt.Errorf("%w: GGUF version %d is not supported (want 2 or 3)", ErrFormat, f.Version)
	}
	nTensors, err := r.count("tensor", 8+4+8+4, maxTensors)
	if err != nil {
		return nil, err
	}
	nKV, err := r.count("metadata", 8+4, maxKVs)
	if err != nil {
		return nil, err
	}
	seen := make(map[string]bool, nKV)
	for range nKV {
		key, err := r.str(maxKeyLen)
		if err != nil {
			return nil, err
		}
		if seen[key] {
			return nil, r.fail("duplicate key %q", key)
		}
		seen[key] = true
		t, err := r.u32()
		if err != nil {
			return nil, err
		}
		v, err := r.value(t, 0)
		if err != nil {
			return nil, fmt.Errorf("key %q: %w", key, err)
		}
		f.KVs = append(f.KVs, KV{Key: key, Value: v})
	}
	if a, ok := f.Get("general.alignment").(uint32); ok {
		if a == 0 || a&(a-1) != 0 {
			return nil, fmt.Errorf("%w: general.alignment %d is not a power of two", ErrFormat, a)
		}
		f.Alignment = uint64(a)
	}
	names := make(map[string]bool, nTensors)
	for range nTensors {
		var t TensorInfo
		if t.Name, err = r.str(maxNameLen); err != nil {
			return nil, err
		}
		if names[t.Name] {
			return nil, r.fail("duplicate tensor %q", t.Name)
		}
		names[t.Name] = true
		nd, err := r.u32()
		if err != nil {
			return nil, err
		}
		if nd == 0 || nd > maxDims {
			return nil, fmt.Errorf("%w: tensor %q has %d dimensions (want 1 to %d)", ErrFormat, t.Name, nd, maxDims)
		}
		elems := uint64(1)
		for range nd {
			d, err := r.u64()
			if err != nil {
				return nil, err
			}
			if d == 0 || d > math.MaxInt64/elems {
				return nil, fmt.Errorf("%w: tensor %q has dimension %d", ErrFormat, t.Name, d)
			}
			elems *= d
			t.Shape = append(t.Shape, d)
		}
		typ, err := r.u32()
		if err != nil {
			return nil, err
		}
		t.Type = DType(typ)
		if !t.Type.Known() {
			return nil, fmt.Errorf("tensor %q: %w: ggml type %d", t.Name, ErrUnsupportedDType, typ)
		}
		if t.Shape[0]%t.Type.BlockSize() != 0 {
			return nil, fmt.Errorf("%w: tensor %q: row of %d elements is not a multiple of %s's block of %d",
				ErrFormat, t.Name, t.Shape[0], t.Type, t.Type.BlockSize())
		}
		if t.Offset, err = r.u64(); err != nil {
			return nil, err
		}
		if t.Offset%f.Alignment != 0 {
			return nil, fmt.Errorf("%w: tensor %q offset %d is not aligned to %d", ErrFormat, t.Name, t.Offset, f.Alignment)
		}
		f.Tensors = append(f.Tensors, t)
	}
	f.DataOffset = int64(alignUp(uint64(r.pos), f.Alignment))
	for _, t := range f.Tensors {
		if end := uint64(f.DataOffset) + t.Offset + t.Size(); t.Offset > uint64(size) || end > uint64(size) {
			return nil, fmt.Errorf("%w: tensor %q ends at byte %d, past the end of the %d-byte file (truncated?)",
				ErrFormat, t.Name, end, size)
		}
	}
	return f, nil
}

func alignUp(n, a uint64) uint64 { return (n + a - 1) / a * a }

// TensorData is a tensor to write: its info (Offset is ignored) and its
// bytes.
type TensorData struct {
	Info TensorInfo
	// Data yields exactly Info.Size() bytes.
	Data io.Reader
}

// Write writes a GGUF v3 file: the KVs in the order given, then the tensor
// infos and data in the order given, each aligned to DefaultAlignment (or
// general.alignment if set). The output depends only on the inputs.
func Write(w io.Writer, kvs []KV, tensors []TensorData) error {
	bw := bufio.NewWriterSize(w, 1<<20)
	cw := &countWriter{w: bw}
	align := uint64(DefaultAlignment)
	for _, kv := range kvs {
		if kv.Key == "general.alignment" {
			a, ok := kv.Value.(uint32)
			if !ok || a == 0 || a&(a-1) != 0 {
				return fmt.Errorf("write gguf: general.alignment must be a uint32 power of two, got %v", kv.Value)
			}
			align = uint64(a)
		}
	}
	le := binary.LittleEndian
	put := func(v any) { _ = binary.Write(cw, le, v) } // errors surface through cw.err
	put(uint32(ggufMagic))
	put(uint32(ggufVersion))
	put(uint64(len(tensors)))
	put(uint64(len(kvs)))
	for _, kv := range kvs {
		putString(cw, kv.Key)
		if err := putValue(cw, kv.Value, true); err != nil {
			return fmt.Errorf("write gguf: key %q: %w", kv.Key, err)
		}
	}
	var off uint64
	for _, t := range tensors {
		if len(t.Info.Shape) == 0 || len(t.Info.Shape) > maxDims {
			return fmt.Errorf("write gguf: tensor %q: %d dimensions", t.Info.Name, len(t.Info.Shape))
		}
		putString(cw, t.Info.Name)
		put(uint32(len(t.Info.Shape)))
		for _, d := range t.Info.Shape {
			put(d)
		}
		put(uint32(t.Info.Type))
		put(off)
		off = alignUp(off+t.Info.Size(), align)
	}
	pad := func() {
		if n := alignUp(uint64(cw.n), align) - uint64(cw.n); n > 0 {
			_, _ = cw.Write(make([]byte, n))
		}
	}
	pad()
	for _, t := range tensors {
		n, err := io.Copy(cw, t.Data)
		if err != nil {
			return fmt.Errorf("write gguf: tensor %q: %w", t.Info.Name, err)
		}
		if uint64(n) != t.Info.Size() {
			return fmt.Errorf("write gguf: tensor %q: got %d bytes of data, want %d", t.Info.Name, n, t.Info.Size())
		}
		pad()
	}
	if cw.err != nil {
		return fmt.Errorf("write gguf: %w", cw.err)
	}
	return bw.Flush()
}

type countWriter struct {
	w   io.Writer
	n   int64
	err error
}

func (c *countWriter) Write(p []byte) (int, error) {
	if c.err != nil {
		return 0, c.err
	}
	n, err := c.w.Write(p)
	c.n += int64(n)
	c.err = err
	return n, err
}

func putString(w io.Writer, s string) {
	_ = binary.Write(w, binary.LittleEndian, uint64(len(s)))
	_, _ = io.WriteString(w, s)
}

// putValue writes a typed value; withType also writes its type tag.
func putValue(w io.Writer, v any, withType bool) error {
	le := binary.LittleEndian
	tag := func(t uint32) {
		if withType {
			_ = binary.Write(w, le, t)
		}
	}
	arr := func(et uint32, n int, each func(i int)) {
		tag(typeArray)
		_ = binary.Write(w, le, et)
		_ = binary.Write(w, le, uint64(n))
		for i := range n {
			each(i)
		}
	}
	switch v := v.(type) {
	case uint8:
		tag(typeUint8)
		_ = binary.Write(w, le, v)
	case int8:
		tag(typeInt8)
		_ = binary.Write(w, le, v)
	case uint16:
		tag(typeUint16)
		_ = binary.Write(w, le, v)
	case int16:
		tag(typeInt16)
		_ = binary.Write(w, le, v)
	case uint32:
		tag(typeUint32)
		_ = binary.Write(w, le, v)
	case int32:
		tag(typeInt32)
		_ = binary.Write(w, le, v)
	case float32:
		tag(typeFloat32)
		_ = binary.Write(w, le, v)
	case bool:
		tag(typeBool)
		_ = binary.Write(w, le, v)
	case string:
		tag(typeString)
		putString(w, v)
	case uint64:
		tag(typeUint64)
		_ = binary.Write(w, le, v)
	case int64:
		tag(typeInt64)
		_ = binary.Write(w, le, v)
	case float64:
		tag(typeFloat64)
		_ = binary.Write(w, le, v)
	case []string:
		arr(typeString, len(v), func(i int) { putString(w, v[i]) })
	default:
		et, n, ok := sliceType(v)
		if !ok {
			return fmt.Errorf("unsupported value type %T", v)
		}
		tag(typeArray)
		_ = binary.Write(w, le, et)
		_ = binary.Write(w, le, uint64(n))
		_ = binary.Write(w, le, v) // a slice of fixed-size values, little-endian
	}
	return nil
}

// sliceType is the GGUF element type and length of a numeric slice.
func sliceType(v any) (uint32, int, bool) {
	switch v := v.(type) {
	case []uint8:
		return typeUint8, len(v), true
	case []int8:
		return typeInt8, len(v), true
	case []uint16:
		return typeUint16, len(v), true
	case []int16:
		return typeInt16, len(v), true
	case []uint32:
		return typeUint32, len(v), true
	case []int32:
		return typeInt32, len(v), true
	case []float32:
		return typeFloat32, len(v), true
	case []bool:
		return typeBool, len(v), true
	case []uint64:
		return typeUint64, len(v), true
	case []int64:
		return typeInt64, len(v), true
	case []float64:
		return typeFloat64, len(v), true
	}
	return 0, 0, false
}
