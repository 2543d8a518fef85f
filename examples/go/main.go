// Command app is the session-gateway example app in Go, standard library only.
//
// The gateway in front of this app keeps the session. It sends the session
// data as JSON in the X-Session request header ({} for a new visitor), and
// the app changes it with response headers:
//
//	X-Session-Patch: {...}          merge into the session (RFC 7396; null deletes a key)
//	X-Session-Action: regenerate    new session id, same data (on login)
//	X-Session-Action: destroy       delete the session, expire the cookie (on logout)
package main

import (
	"encoding/json"
	"fmt"
	"log"
	"net/http"
	"os"
	"strings"
	"unicode/utf16"
)

// Session is the data this app keeps in the session.
type Session struct {
	User   *string        `json:"user"`
	Visits int            `json:"visits"`
	Cart   map[string]int `json:"cart"`
}

// asciiJSON is JSON with every non-ASCII character \u-escaped: json.Marshal
// leaves them raw, and a header value must stay ASCII.
func asciiJSON(v any) string {
	b, _ := json.Marshal(v)
	var out strings.Builder
	for _, r := range string(b) {
		if r < 0x7f {
			out.WriteRune(r)
			continue
		}
		for _, u := range utf16.Encode([]rune{r}) {
			fmt.Fprintf(&out, `\u%04x`, u)
		}
	}
	return out.String()
}

func handle(w http.ResponseWriter, r *http.Request) {
	// The session data the gateway sent with this request.
	s := Session{Cart: map[string]int{}}
	json.Unmarshal([]byte(r.Header.Get("X-Session")), &s) // absent: stays empty
	q := r.URL.Query()
	status, body := http.StatusOK, any(nil)
	switch r.Method + " " + r.URL.Path {
	case "GET /":
		s.Visits++
		w.Header().Set("X-Session-Patch", asciiJSON(map[string]int{"visits": s.Visits}))
		body = map[string]any{"visits": s.Visits, "user": s.User}
	case "GET /login", "POST /login":
		if user := q.Get("user"); user == "" {
			status, body = http.StatusBadRequest, map[string]string{"error": "user required"}
		} else {
			w.Header().Set("X-Session-Patch", asciiJSON(map[string]string{"user": user}))
			// A new session id on login, so an id planted before it is worthless.
			w.Header().Set("X-Session-Action", "regenerate")
			body = map[string]string{"user": user}
		}
	case "GET /logout", "POST /logout":
		w.Header().Set("X-Session-Action", "destroy")
		body = map[string]bool{"logged_out": true}
	case "GET /cart/add", "POST /cart/add":
		if item := q.Get("item"); item == "" {
			status, body = http.StatusBadRequest, map[string]string{"error": "item required"}
		} else {
			s.Cart[item]++
			// The patch names only this item: the gateway merges it into the stored
			// cart, so requests adding other items at the same time are not lost.
			patch := map[string]any{"cart": map[string]int{item: s.Cart[item]}}
			w.Header().Set("X-Session-Patch", asciiJSON(patch))
			body = s.Cart
		}
	case "GET /cart":
		body = s.Cart
	default:
		status, body = http.StatusNotFound, map[string]string{"error": "not found"}
	}
	w.Header().Set("Content-Type", "application/json; charset=utf-8")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(body)
}

func main() {
	host, port := os.Getenv("HOST"), os.Getenv("PORT")
	if host == "" {
		host = "127.0.0.1"
	}
	if port == "" {
		port = "8000"
	}
	log.Fatal(http.ListenAndServe(host+":"+port, http.HandlerFunc(handle)))
}
