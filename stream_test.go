package main

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"
)

func TestSSEReader(t *testing.T) {
	long := strings.Repeat("x", 200<<10) // far past bufio.MaxScanTokenSize
	type ev struct{ name, data string }
	tests := []struct {
		name    string
		in      string
		want    []ev
		wantErr error
	}{
		{"named events", "event: a\ndata: {\"x\":1}\n\nevent: b\ndata: 2\n\n", []ev{{"a", `{"x":1}`}, {"b", "2"}}, io.EOF},
		{"data only", "data: {\"type\":\"t\"}\n\n", []ev{{"", `{"type":"t"}`}}, io.EOF},
		{"multi-line data", "data: a\ndata: b\n\n", []ev{{"", "a\nb"}}, io.EOF},
		{"comments and unknown fields", ": keepalive\nid: 7\nretry: 10\ndata:x\n\n", []ev{{"", "x"}}, io.EOF},
		{"crlf", "event: a\r\ndata: 1\r\n\r\n", []ev{{"a", "1"}}, io.EOF},
		{"event without data is dropped", "event: a\n\ndata: 1\n\n", []ev{{"", "1"}}, io.EOF},
		{"200 KiB line", "data: " + long + "\n\n", []ev{{"", long}}, io.EOF},
		{"cut mid-event", "data: 1\n\ndata: 2\n", []ev{{"", "1"}}, io.ErrUnexpectedEOF},
		{"cut mid-line", "data: 1\n\ndata: {\"par", []ev{{"", "1"}}, io.ErrUnexpectedEOF},
		{"empty", "", nil, io.EOF},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			rd := newSSEReader(strings.NewReader(tc.in))
			var got []ev
			var err error
			for {
				var name, data []byte
				if name, data, err = rd.next(); err != nil {
					break
				}
				got = append(got, ev{string(name), string(data)})
			}
			if !errors.Is(err, tc.wantErr) {
				t.Errorf("error = %v; want %v", err, tc.wantErr)
			}
			if fmt.Sprint(got) != fmt.Sprint(tc.want) {
				t.Errorf("events = %.200v; want %.200v", got, tc.want)
			}
		})
	}
}

func TestSSEReaderTooLarge(t *testing.T) {
	in := io.MultiReader(strings.NewReader("data: "), strings.NewReader(strings.Repeat("x", maxEventBytes+1)), strings.NewReader("\n\n"))
	if _, _, err := newSSEReader(in).next(); !errors.Is(err, errEventTooLarge) {
		t.Errorf("error = %v; want %v", err, errEventTooLarge)
	}
}

// TestSSEWriterFlushAndKeepalive proves that an event reaches the client
// while the handler is still running, and that silence produces keepalives.
func TestSSEWriterFlushAndKeepalive(t *testing.T) {
	sawEvent := make(chan struct{})
	sawKeepalive := make(chan struct{})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		sw := newSSEWriter(&statusWriter{ResponseWriter: w}, 10*time.Millisecond)
		defer sw.close()
		sw.event("", []byte(`{"n":1}`))
		sw.flush()
		<-sawEvent     // the client read the event: it was flushed
		<-sawKeepalive // silence until the client saw a keepalive
		sw.event("done", []byte("a\nb"))
		sw.flush()
	}))
	defer srv.Close()
	resp, err := http.Get(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if ct := resp.Header.Get("Content-Type"); ct != "text/event-stream" {
		t.Errorf("Content-Type = %q; want text/event-stream", ct)
	}
	br := bufio.NewReader(resp.Body)
	expect := func(want string) {
		t.Helper()
		got, err := br.ReadString('\n')
		if err != nil || got != want {
			t.Fatalf("line = %q, %v; want %q", got, err, want)
		}
	}
	expect("data: {\"n\":1}\n")
	expect("\n")
	close(sawEvent)
	expect(": keepalive\n")
	expect("\n")
	close(sawKeepalive)
	for {
		line, err := br.ReadString('\n')
		if err != nil {
			t.Fatalf("stream ended before the last event: %v", err)
		}
		if line == "event: done\n" {
			break
		}
	}
	expect("data: a\n")
	expect("data: b\n")
}

// fakeTokens is a tokenSource that hands out tok1, then tok2 after a 401.
type fakeTokens struct {
	mu       sync.Mutex
	rejected []string
}

func (f *fakeTokens) token(ctx context.Context, rejected string) (secret, string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if rejected != "" {
		f.rejected = append(f.rejected, rejected)
		return "tok2", "acct", nil
	}
	if len(f.rejected) > 0 {
		return "tok2", "acct", nil
	}
	return "tok1", "acct", nil
}

func TestUpstreamDo(t *testing.T) {
	type reply struct {
		status int
		header map[string]string
		body   string
	}
	usage := `{"error":{"type":"usage_limit_reached","message":"The usage limit has been reached","plan_type":"plus","resets_at":1776672030,"resets_in_seconds":17778}}`
	tests := []struct {
		name       string
		replies    []reply
		wantStatus int // of the response, or of the *apiError
		wantCalls  int
		wantMsg    string
		wantHeader map[string]string
	}{
		{"ok", []reply{{status: 200}}, 200, 1, "", nil},
		{"401 refreshes once", []reply{{status: 401, body: `{"detail":"Unauthorized"}`}, {status: 200}}, 200, 2, "", nil},
		{"401 twice", []reply{{status: 401}, {status: 401, body: `{"detail":"Unauthorized"}`}}, 401, 2, "ccproxy auth login-openai", nil},
		{"500 then 200", []reply{{status: 500}, {status: 503}, {status: 200}}, 200, 3, "", nil},
		{"5xx exhausted", []reply{{status: 500}, {status: 500}, {status: 500}, {status: 502, body: `{"detail":"boom"}`}}, 502, 4, "boom", nil},
		{"retry-after too long", []reply{{status: 503, header: map[string]string{"Retry-After": "3600"}}}, 502, 1, "retry in 1h0m0s", nil},
		{"usage limit", []reply{{status: 429, body: usage, header: map[string]string{"X-Codex-Plan-Type": "plus"}}}, 429, 1,
			"resets at 2026-", map[string]string{"Retry-After": "17778", "X-Codex-Plan-Type": "plus"}},
		{"400 detail relayed", []reply{{status: 400, body: `{"detail":"Unsupported parameter: temperature"}`}}, 400, 1, "Unsupported parameter: temperature", nil},
		{"400 error relayed", []reply{{status: 400, body: `{"error":{"message":"Unsupported value: 'none'","type":"invalid_request_error","param":"reasoning.effort","code":"unsupported_value"}}`}}, 400, 1, "Unsupported value: 'none'", nil},
		{"cloudflare challenge, retried once", []reply{{status: 403, body: "<!DOCTYPE html><html>Just a moment…"}, {status: 403, body: "<!DOCTYPE html><html>Just a moment…"}}, 502, 2, "Cloudflare", nil},
		{"cloudflare mitigated header", []reply{{status: 403, header: map[string]string{"Cf-Mitigated": "challenge"}}, {status: 200}}, 200, 2, "", nil},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var mu sync.Mutex
			calls := 0
			var auths []string
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				mu.Lock()
				rep := tc.replies[min(calls, len(tc.replies)-1)]
				calls++
				auths = append(auths, r.Header.Get("Authorization"))
				mu.Unlock()
				for k, v := range rep.header {
					w.Header().Set(k, v)
				}
				w.WriteHeader(rep.status)
				io.WriteString(w, rep.body)
			}))
			defer srv.Close()
			up := newUpstream(srv.URL, &fakeTokens{}, srv.Client())
			up.backoff = time.Millisecond
			up.now = func() time.Time { return time.Unix(1776654252, 0) }
			resp, err := up.do(context.Background(), "POST", up.base+"/responses", []byte(`{}`), nil)
			status := 0
			var h http.Header
			var msg string
			if err != nil {
				ae := show(err)
				status, h, msg = ae.status, ae.header, ae.message
			} else {
				status, h = resp.StatusCode, resp.Header
				resp.Body.Close()
			}
			if status != tc.wantStatus || calls != tc.wantCalls {
				t.Errorf("status %d after %d calls; want %d after %d (err %v)", status, calls, tc.wantStatus, tc.wantCalls, err)
			}
			if !strings.Contains(msg, tc.wantMsg) {
				t.Errorf("message %q; want it to contain %q", msg, tc.wantMsg)
			}
			for k, v := range tc.wantHeader {
				if got := h.Get(k); got != v {
					t.Errorf("header %s = %q; want %q", k, got, v)
				}
			}
			if tc.wantCalls == 2 && tc.replies[0].status == 401 && (auths[0] != "Bearer tok1" || auths[1] != "Bearer tok2") {
				t.Errorf("authorization headers %q; want tok1 then the refreshed tok2", auths)
			}
		})
	}
}

func TestUpstreamTransportError(t *testing.T) {
	srv := httptest.NewServer(http.NotFoundHandler())
	url := srv.URL
	srv.Close() // nothing listens any more
	up := newUpstream(url, &fakeTokens{}, http.DefaultClient)
	up.backoff = time.Millisecond
	_, err := up.do(context.Background(), "GET", up.base+"/models", nil, nil)
	if ae := show(err); ae.status != 502 || !strings.Contains(ae.message, "after 4 attempts") {
		t.Errorf("err = %v; want a 502 after 4 attempts", err)
	}
}

// TestUpstreamHeaders checks the headers the backend receives: the Codex CLI's, with
// ccproxy's credentials.
func TestUpstreamHeaders(t *testing.T) {
	got := make(chan http.Header, 1)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		got <- r.Header.Clone()
	}))
	defer srv.Close()
	up := newUpstream(srv.URL, &fakeTokens{}, srv.Client())
	resp, err := up.do(context.Background(), "POST", up.base+"/responses", []byte(`{}`), http.Header{"Session-Id": {"s1"}, "Accept": {"text/event-stream"}})
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	h := <-got
	for k, want := range map[string]string{
		"Authorization": "Bearer tok1", "Chatgpt-Account-Id": "acct", "Accept": "text/event-stream",
		"Originator": "codex_cli_rs", "Version": codexVersion, "Session-Id": "s1", "Content-Type": "application/json",
	} {
		if h.Get(k) != want {
			t.Errorf("header %s = %q; want %q", k, h.Get(k), want)
		}
	}
	if ua := h.Get("User-Agent"); !strings.HasPrefix(ua, "codex_cli_rs/"+codexVersion) {
		t.Errorf("User-Agent = %q; want the Codex CLI form", ua)
	}
}

// FuzzSSEReader feeds arbitrary bytes to the upstream parser: it must not
// panic or hang, and the events it returns must survive a round trip
// through the writer's encoding.
func FuzzSSEReader(f *testing.F) {
	for _, s := range []string{
		"event: response.output_text.delta\ndata: {\"delta\":\"hi\"}\n\n",
		"data: a\ndata: b\n\n: comment\n\n",
		"event: x\r\ndata: 1\r\n\r\n",
		"data:no-space\n\ndata: {\"cut",
		"\n\n\n:only comments\n",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		type ev struct{ name, data string }
		parse := func(b []byte) ([]ev, error) {
			var out []ev
			rd := newSSEReader(bytes.NewReader(b))
			for {
				name, data, err := rd.next()
				if err != nil {
					return out, err
				}
				out = append(out, ev{string(name), string(data)})
			}
		}
		events, _ := parse(in)
		var enc bytes.Buffer
		for _, e := range events {
			if strings.ContainsAny(e.name, "\r\n") {
				t.Fatalf("event name %q contains a line break", e.name)
			}
			if e.name != "" {
				fmt.Fprintf(&enc, "event: %s\n", e.name)
			}
			for _, line := range strings.Split(e.data, "\n") {
				fmt.Fprintf(&enc, "data: %s\n", line)
			}
			enc.WriteString("\n")
		}
		again, err := parse(enc.Bytes())
		if !errors.Is(err, io.EOF) || fmt.Sprint(again) != fmt.Sprint(events) {
			t.Fatalf("round trip changed the events:\n%q\n%q (%v)", events, again, err)
		}
	})
}
