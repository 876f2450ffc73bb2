package node

import (
	"encoding"
	"fmt"
	"reflect"
	"sort"
	"strconv"
	"strings"
)

// EnvPrefix starts every environment variable neurod reads.
const EnvPrefix = "NEURO_"

// Sources says where a config key's value came from when it was not the
// config file: a flag ("flag --listen") or an environment variable
// ("NEURO_P2P_LISTEN"). Keys are dotted toml paths.
type Sources map[string]string

// Describe wraps a validation error with the place the bad value came from:
// the flag, the environment variable or the config file.
func (s Sources) Describe(err error, file string) error {
	if fe, ok := err.(*FieldError); ok {
		key := fe.Key
		if i := strings.IndexByte(key, '['); i >= 0 {
			key = key[:i]
		}
		if src, ok := s[key]; ok {
			return fmt.Errorf("%s: %w", src, fe.Err)
		}
	}
	return fmt.Errorf("config %s: %w", file, err)
}

// EnvVar returns the environment variable of a dotted config key.
func EnvVar(key string) string {
	return EnvPrefix + strings.ToUpper(strings.ReplaceAll(key, ".", "_"))
}

// ConfigKeys lists every settable dotted key of Config, sorted.
func ConfigKeys() []string {
	var keys []string
	walkConfig(reflect.ValueOf(&Config{}).Elem(), "", func(key string, _ reflect.Value) {
		keys = append(keys, key)
	})
	sort.Strings(keys)
	return keys
}

// ApplyEnv overrides cfg with the NEURO_* variables found by lookup (use
// os.LookupEnv) and records each one in src. A variable that does not parse
// is an error naming it.
func ApplyEnv(cfg *Config, lookup func(string) (string, bool), src Sources) error {
	var firstErr error
	walkConfig(reflect.ValueOf(cfg).Elem(), "", func(key string, v reflect.Value) {
		name := EnvVar(key)
		raw, ok := lookup(name)
		if !ok || firstErr != nil {
			return
		}
		if err := setValue(v, raw); err != nil {
			firstErr = fmt.Errorf("%s: %w", name, err)
			return
		}
		src[key] = name
	})
	return firstErr
}

func walkConfig(v reflect.Value, prefix string, leaf func(key string, v reflect.Value)) {
	t := v.Type()
	for i := 0; i < t.NumField(); i++ {
		f := t.Field(i)
		tag := strings.Split(f.Tag.Get("toml"), ",")[0]
		if tag == "" || tag == "-" {
			continue
		}
		key := tag
		if prefix != "" {
			key = prefix + "." + tag
		}
		fv := v.Field(i)
		if fv.Kind() == reflect.Struct {
			walkConfig(fv, key, leaf)
			continue
		}
		leaf(key, fv)
	}
}

var textUnmarshaler = reflect.TypeFor[encoding.TextUnmarshaler]()

// setValue parses raw into a config leaf.
func setValue(v reflect.Value, raw string) error {
	if v.Addr().Type().Implements(textUnmarshaler) {
		return v.Addr().Interface().(encoding.TextUnmarshaler).UnmarshalText([]byte(raw))
	}
	switch v.Kind() {
	case reflect.String:
		v.SetString(raw)
	case reflect.Bool:
		b, err := strconv.ParseBool(raw)
		if err != nil {
			return fmt.Errorf("%q: want true or false", raw)
		}
		v.SetBool(b)
	case reflect.Int:
		n, err := strconv.Atoi(raw)
		if err != nil {
			return fmt.Errorf("%q: want an integer", raw)
		}
		v.SetInt(int64(n))
	case reflect.Float64:
		f, err := strconv.ParseFloat(raw, 64)
		if err != nil {
			return fmt.Errorf("%q: want a number", raw)
		}
		v.SetFloat(f)
	case reflect.Slice:
		var items []string
		for _, s := range strings.Split(raw, ",") {
			if s = strings.TrimSpace(s); s != "" {
				items = append(items, s)
			}
		}
		if items == nil {
			items = []string{}
		}
		v.Set(reflect.ValueOf(items))
	default:
		return fmt.Errorf("unsupported config type %s", v.Type())
	}
	return nil
}
