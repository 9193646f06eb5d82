package main

import (
	"bufio"
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// maxEventBytes bounds one upstream SSE event. Output items can carry whole
// images as base64, so it is far above bufio.MaxScanTokenSize (64 KiB), but
// still a bound: one reply cannot make the proxy allocate without limit.
const maxEventBytes = 32 << 20

// errEventTooLarge reports an upstream event over maxEventBytes.
var errEventTooLarge = errors.New("upstream event exceeds 32 MiB")

// sseReader parses a text/event-stream body (WHATWG HTML §9.2.6): "event:"
// and "data:" fields, multi-line data joined with "\n", ":" comments, and a
// blank line ending each event. Lines have no length limit below
// maxEventBytes.
type sseReader struct {
	r       *bufio.Reader
	name    []byte
	data    []byte
	long    []byte // reassembles lines longer than the bufio buffer
	pending []byte // rest of the current physical line after a lone CR
}

// newSSEReader reads events from r. The buffer is bufio's default 4 KiB:
// deltas are a few hundred bytes, longer lines are reassembled in s.long,
// and a thousand open streams should not pin 64 MiB of buffers.
func newSSEReader(r io.Reader) *sseReader {
	return &sseReader{r: bufio.NewReader(r)}
}

// next returns the next event. name and data are valid until the following
// call. It returns io.EOF at a clean end and io.ErrUnexpectedEOF when the
// stream stops inside an event.
func (s *sseReader) next() (name, data []byte, err error) {
	s.name, s.data = s.name[:0], s.data[:0]
	hasData := false
	for {
		line, err := s.line()
		if err != nil {
			if errors.Is(err, io.EOF) && (hasData || len(s.name) > 0) {
				err = io.ErrUnexpectedEOF
			}
			return nil, nil, err
		}
		if len(line) == 0 {
			if hasData {
				return s.name, s.data, nil
			}
			s.name = s.name[:0] // an event without data is not dispatched
			continue
		}
		field, value, _ := bytes.Cut(line, []byte(":"))
		value = bytes.TrimPrefix(value, []byte(" "))
		switch string(field) {
		case "event":
			s.name = append(s.name[:0], value...)
		case "data":
			if hasData {
				s.data = append(s.data, '\n')
			}
			if len(s.data)+len(value) > maxEventBytes {
				return nil, nil, errEventTooLarge
			}
			s.data = append(s.data, value...)
			hasData = true
		}
		// "" is a comment; "id" and "retry" mean nothing to a proxy.
	}
}

// line returns the next line without its terminator. CR, LF and CRLF all
// end a line (WHATWG HTML §9.2.5), so a stray CR can never smuggle a line
// break into an event name or data line that is relayed to the client.
func (s *sseReader) line() ([]byte, error) {
	if len(s.pending) == 0 {
		line, err := s.r.ReadSlice('\n')
		if errors.Is(err, bufio.ErrBufferFull) {
			s.long = append(s.long[:0], line...)
			for errors.Is(err, bufio.ErrBufferFull) {
				line, err = s.r.ReadSlice('\n')
				if len(s.long)+len(line) > maxEventBytes+64 {
					return nil, errEventTooLarge
				}
				s.long = append(s.long, line...)
			}
			line = s.long
		}
		if err != nil {
			if errors.Is(err, io.EOF) && len(line) > 0 {
				err = io.ErrUnexpectedEOF
			}
			return nil, err
		}
		s.pending = line // ends in '\n'; stays valid until the next read
	}
	line := s.pending
	i := bytes.IndexAny(line, "\r\n")
	end := i + 1
	if line[i] == '\r' && end < len(line) && line[end] == '\n' {
		end++
	}
	s.pending = line[end:]
	return line[:i], nil
}

// buffered reports whether more upstream bytes have already arrived, so the
// writer can coalesce the flush of events that came together.
func (s *sseReader) buffered() bool { return len(s.pending) > 0 || s.r.Buffered() > 0 }

// sseWriter writes server-sent events to the client. Every event is written
// whole; flush pushes them to the network. While the writer is idle it sends a
// ": keepalive" comment every interval, so clients and intermediaries do not
// give up during long reasoning.
type sseWriter struct {
	mu       sync.Mutex
	w        http.ResponseWriter
	rc       *http.ResponseController
	buf      []byte
	err      error // first write error: the client is gone
	done     bool
	interval time.Duration
	idle     *time.Timer
}

// startSSE sends the response headers and starts the keepalive timer. The
// caller must call close before the handler returns.
func startSSE(w http.ResponseWriter, interval time.Duration) *sseWriter {
	h := w.Header()
	h.Set("Content-Type", "text/event-stream")
	h.Set("Cache-Control", "no-cache")
	h.Set("X-Accel-Buffering", "no") // keeps reverse proxies such as nginx from buffering
	w.WriteHeader(http.StatusOK)
	s := &sseWriter{w: w, rc: http.NewResponseController(w), interval: interval}
	s.mu.Lock() // the timer may fire before s.idle is set
	defer s.mu.Unlock()
	s.err = s.rc.Flush()
	s.idle = time.AfterFunc(interval, s.keepalive)
	return s
}

// keepalive runs on the timer's goroutine.
func (s *sseWriter) keepalive() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.done || s.err != nil {
		return
	}
	s.writeLocked([]byte(": keepalive\n\n"))
	s.flushLocked()
}

// event writes one event; name may be empty. data containing newlines is
// split over several data lines, as the format requires.
func (s *sseWriter) event(name string, data []byte) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	b := s.buf[:0]
	if name != "" {
		b = append(append(append(b, "event: "...), name...), '\n')
	}
	for {
		line, rest, more := bytes.Cut(data, []byte("\n"))
		b = append(append(append(b, "data: "...), line...), '\n')
		if !more {
			break
		}
		data = rest
	}
	s.buf = append(b, '\n')
	return s.writeLocked(s.buf)
}

// flush sends what has been written and restarts the keepalive clock.
func (s *sseWriter) flush() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.flushLocked()
}

func (s *sseWriter) writeLocked(b []byte) error {
	if s.err == nil {
		_, s.err = s.w.Write(b)
	}
	return s.err
}

func (s *sseWriter) flushLocked() error {
	if s.err == nil {
		s.err = s.rc.Flush()
		s.idle.Reset(s.interval)
	}
	return s.err
}

// close stops the keepalives; nothing is written after it returns.
func (s *sseWriter) close() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.done = true
	s.idle.Stop()
}

// tokenSource supplies the bearer token and ChatGPT account id; authStore is
// the real one. rejected is a token the backend just answered 401 to.
type tokenSource interface {
	token(ctx context.Context, rejected string) (secret, string, error)
}

// The Codex CLI version whose requests ccproxy reproduces (codex-backend.md
// §0). The backend uses originator and version for analytics and routing;
// none is known to be validated, but matching the CLI avoids surprises.
const (
	codexVersion    = "0.169.0"
	codexOriginator = "codex_cli_rs"
)

// upstream calls the Codex backend.
type upstream struct {
	base    string
	auth    tokenSource
	client  *http.Client
	now     func() time.Time
	retries int           // extra attempts after 5xx or transport errors
	backoff time.Duration // first retry delay, doubled each time
	agent   string
	usage   atomic.Pointer[http.Header] // latest x-codex-* headers, for GET /codex/usage
}

// newUpstream returns a client for the backend at base.
func newUpstream(base string, auth tokenSource, client *http.Client) *upstream {
	return &upstream{
		base: base, auth: auth, client: client, now: time.Now,
		// The Codex CLI retries 4 times from 200 ms (codex-backend.md §5.1);
		// an interactive proxy gives up a little sooner.
		retries: 3, backoff: 200 * time.Millisecond,
		agent: fmt.Sprintf("%s/%s (%s; %s) ccproxy", codexOriginator, codexVersion, runtime.GOOS, runtime.GOARCH),
	}
}

// newUpstreamClient returns the HTTP client for the backend. It has no
// Client.Timeout, which "includes … reading the response body" and would cut
// long streams; ResponseHeaderTimeout and the request context bound it.
func newUpstreamClient() *http.Client {
	t := http.DefaultTransport.(*http.Transport).Clone()
	t.ResponseHeaderTimeout = 2 * time.Minute
	t.MaxIdleConnsPerHost = 64
	return &http.Client{Transport: t}
}

// do sends one request to the backend and returns a 2xx or 304 response. A
// 401 is retried once with a refreshed token; 5xx and transport errors are
// retried with backoff (honouring Retry-After) before any byte reached the
// client. Other failures become an *apiError carrying the backend's message.
func (u *upstream) do(ctx context.Context, method, path string, body []byte, header http.Header) (*http.Response, error) {
	rejected := ""
	for attempt := 0; ; {
		tok, account, err := u.auth.token(ctx, rejected)
		if err != nil && !errors.Is(err, errLoginRequired) && ctx.Err() == nil {
			err = &apiError{status: 502, typ: "api_error", code: "token_refresh_failed",
				message: "could not refresh the ChatGPT token (" + err.Error() + "); try again, or run `ccproxy auth login-openai`"}
		}
		if err != nil {
			return nil, err
		}
		req, err := http.NewRequestWithContext(ctx, method, u.base+path, bytes.NewReader(body))
		if err != nil {
			return nil, err
		}
		for k, v := range header {
			req.Header[k] = v
		}
		req.Header.Set("Authorization", "Bearer "+string(tok))
		req.Header.Set("Chatgpt-Account-Id", account)
		req.Header.Set("Originator", codexOriginator)
		req.Header.Set("Version", codexVersion)
		req.Header.Set("User-Agent", u.agent)
		if body != nil {
			req.Header.Set("Content-Type", "application/json")
		}
		resp, err := u.client.Do(req)
		var delay time.Duration
		switch {
		case err != nil && ctx.Err() != nil:
			return nil, ctx.Err()
		case err != nil:
			if attempt >= u.retries {
				return nil, &apiError{status: 502, typ: "api_error", code: "upstream_unreachable",
					message: fmt.Sprintf("could not reach the Codex backend after %d attempts: %v", attempt+1, err)}
			}
			delay = u.backoff << attempt
		case resp.StatusCode < 300 || resp.StatusCode == http.StatusNotModified:
			u.remember(resp.Header)
			return resp, nil
		case resp.StatusCode == http.StatusUnauthorized && rejected == "":
			drain(resp)
			rejected = string(tok)
			continue
		case resp.StatusCode >= 500 && attempt < u.retries:
			delay = u.backoff << attempt
			if s, err := strconv.Atoi(resp.Header.Get("Retry-After")); err == nil && s >= 0 {
				delay = time.Duration(s) * time.Second
			}
			drain(resp)
			if delay > 30*time.Second {
				return nil, &apiError{status: 502, typ: "api_error", code: "upstream_unavailable",
					message: fmt.Sprintf("the Codex backend is unavailable (HTTP %d) and asks to retry in %s", resp.StatusCode, delay)}
			}
		default:
			u.remember(resp.Header)
			return nil, u.failure(resp)
		}
		attempt++
		t := time.NewTimer(delay)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil, ctx.Err()
		case <-t.C:
		}
	}
}

// drain discards a small body so the connection can be reused, and closes it.
func drain(resp *http.Response) {
	io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	resp.Body.Close()
}

// remember keeps the backend's rate-limit headers for GET /codex/usage.
func (u *upstream) remember(h http.Header) {
	if c := codexHeaders(h); len(c) > 0 {
		u.usage.Store(&c)
	}
}

// codexHeaders returns the x-codex-* headers of h (codex-backend.md §5.2).
func codexHeaders(h http.Header) http.Header {
	var c http.Header
	for k, v := range h {
		if strings.HasPrefix(k, "X-Codex-") {
			if c == nil {
				c = http.Header{}
			}
			c[k] = v
		}
	}
	return c
}

// failure turns a backend error response into the client's error. Bodies come
// as {"detail":"…"} (gateway validation) or {"error":{…}} (model and usage
// errors); the message is relayed verbatim (codex-backend.md §3.4, §5).
func (u *upstream) failure(resp *http.Response) *apiError {
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	var body struct {
		Detail any `json:"detail"`
		Error  struct {
			Message         string `json:"message"`
			Type            string `json:"type"`
			Code            any    `json:"code"`
			Param           string `json:"param"`
			PlanType        string `json:"plan_type"`
			ResetsAt        int64  `json:"resets_at"`
			ResetsInSeconds int64  `json:"resets_in_seconds"`
		} `json:"error"`
	}
	json.Unmarshal(b, &body)
	e := body.Error
	code, _ := e.Code.(string)
	msg := e.Message
	if msg == "" && body.Detail != nil {
		msg = fmt.Sprint(body.Detail)
	}
	if msg == "" {
		msg = strings.TrimSpace(string(b[:min(len(b), 200)]))
		if strings.Contains(msg, "<html") || strings.Contains(msg, "<!DOCTYPE") {
			msg = "an HTML page (probably Cloudflare blocking this network)"
		}
	}
	out := &apiError{status: resp.StatusCode, typ: "invalid_request_error", code: code, param: e.Param,
		header: codexHeaders(resp.Header)}
	if e.Type != "" && e.Type != "usage_limit_reached" && e.Type != "usage_not_included" {
		out.typ = e.Type
	}
	if out.header == nil {
		out.header = http.Header{}
	}
	switch {
	case resp.StatusCode == http.StatusTooManyRequests && (e.Type == "usage_limit_reached" || code == "usage_limit_reached"):
		wait := e.ResetsInSeconds
		if wait <= 0 && e.ResetsAt > 0 {
			wait = e.ResetsAt - u.now().Unix()
		}
		out.typ, out.code = "rate_limit_error", "usage_limit_reached"
		out.message = fmt.Sprintf("ChatGPT usage limit reached (plan %s)", cmp.Or(e.PlanType, "unknown"))
		if wait > 0 {
			out.header.Set("Retry-After", strconv.FormatInt(wait, 10))
			reset := u.now().Add(time.Duration(wait) * time.Second).UTC()
			out.message += fmt.Sprintf("; it resets at %s (in %s)", reset.Format(time.RFC3339), (time.Duration(wait) * time.Second).String())
		}
	case resp.StatusCode == http.StatusTooManyRequests:
		out.typ = "rate_limit_error"
		out.message = "the Codex backend is rate limiting: " + msg
		if ra := resp.Header.Get("Retry-After"); ra != "" {
			out.header.Set("Retry-After", ra)
		}
	case resp.StatusCode == http.StatusUnauthorized:
		out.typ = "authentication_error"
		out.message = "the Codex backend rejected the credentials even after a refresh (" + msg + "): run `ccproxy auth login-openai`"
	case resp.StatusCode >= 500:
		out.status, out.typ = http.StatusBadGateway, "api_error"
		out.message = fmt.Sprintf("the Codex backend failed (HTTP %d): %s", resp.StatusCode, msg)
	default:
		out.message = msg
	}
	return out
}
