package model

import (
	"math"
	"testing"
)

func TestFloat16RoundTrip(t *testing.T) {
	tests := []struct {
		in   float32
		want uint16
	}{
		{0, 0x0000}, {1, 0x3c00}, {-2, 0xc000}, {65504, 0x7bff}, {1e9, 0x7c00},
		{float32(math.Inf(-1)), 0xfc00}, {5.960464477539063e-08, 0x0001}, {0.333333343, 0x3555},
		{1.00048828125, 0x3c00}, // exactly half way: rounds to even
		{1.00146484375, 0x3c02}, // half way, odd below: rounds up
	}
	for _, tc := range tests {
		if got := Float32ToFloat16(tc.in); got != tc.want {
			t.Errorf("Float32ToFloat16(%v) = %#04x, want %#04x", tc.in, got, tc.want)
		}
	}
	for h := 0; h < 0x10000; h++ {
		f := Float16ToFloat32(uint16(h))
		if math.IsNaN(float64(f)) {
			continue
		}
		if back := Float32ToFloat16(f); back != uint16(h) {
			t.Fatalf("%#04x -> %v -> %#04x", h, f, back)
		}
	}
}

func TestEncodeQ8AndQ4(t *testing.T) {
	x := make([]float32, 64)
	for i := range x {
		x[i] = float32(i-32) / 10
	}
	q8, err := Encode(Q8_0, x)
	if err != nil || len(q8) != 68 {
		t.Fatalf("q8_0: %d bytes, %v", len(q8), err)
	}
	// Block 0 holds -3.2 .. -0.1: d = 3.2/127, and -3.2 maps to -127.
	if int8(q8[2]) != -127 {
		t.Fatalf("q8_0 first value %d, want -127", int8(q8[2]))
	}
	q4, err := Encode(Q4_0, x)
	if err != nil || len(q4) != 36 {
		t.Fatalf("q4_0: %d bytes, %v", len(q4), err)
	}
	// d = -3.2 / -8 = 0.4; -3.2 * (1/0.4) + 8.5 = 0.5 -> 0.
	if q4[2]&0x0f != 0 {
		t.Fatalf("q4_0 first nibble %d, want 0", q4[2]&0x0f)
	}
	if _, err := Encode(Q8_0, x[:31]); err == nil {
		t.Fatal("accepted a partial block")
	}
	if _, err := Encode(Q4_K, x); err == nil {
		t.Fatal("accepted a type it cannot encode")
	}
}

func TestEncodeDecode(t *testing.T) {
	x := make([]float32, 256)
	for i := range x {
		x[i] = float32(math.Sin(float64(i))) * 3
	}
	for _, tc := range []struct {
		t   DType
		tol float64 // relative to the largest magnitude
	}{{F32, 0}, {F16, 1e-3}, {Q8_0, 1e-2}, {Q4_0, 0.15}} {
		b, err := Encode(tc.t, x)
		if err != nil {
			t.Fatal(err)
		}
		y, err := Decode(tc.t, b)
		if err != nil || len(y) != len(x) {
			t.Fatalf("%s: %d values, %v", tc.t, len(y), err)
		}
		for i := range x {
			if d := math.Abs(float64(x[i] - y[i])); d > tc.tol*3 {
				t.Fatalf("%s: value %d: %v -> %v", tc.t, i, x[i], y[i])
			}
		}
	}
	if _, err := Decode(Q8_0, make([]byte, 33)); err == nil {
		t.Fatal("accepted a partial block")
	}
}
