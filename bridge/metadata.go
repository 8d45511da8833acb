package bridge

import (
	"net/http"

	"github.com/ferry-id/ferry/bridge/signing"
	"github.com/ferry-id/ferry/proto/ferrypb"
)

// multiTenant are tenant aliases whose metadata carries a {tenantid} template.
var multiTenant = map[string]bool{"common": true, "organizations": true}

type openIDConfiguration struct {
	Issuer                            string   `json:"issuer"`
	AuthorizationEndpoint             string   `json:"authorization_endpoint"`
	TokenEndpoint                     string   `json:"token_endpoint"`
	JWKSURI                           string   `json:"jwks_uri"`
	TokenEndpointAuthMethodsSupported []string `json:"token_endpoint_auth_methods_supported"`
	GrantTypesSupported               []string `json:"grant_types_supported"`
	SubjectTypesSupported             []string `json:"subject_types_supported"`
	IDTokenSigningAlgValuesSupported  []string `json:"id_token_signing_alg_values_supported"`
	RequestURIParameterSupported      bool     `json:"request_uri_parameter_supported"`
	TenantRegionScope                 *string  `json:"tenant_region_scope"`
}

func (b *Bridge) serveMetadataV2(w http.ResponseWriter, r *http.Request) {
	b.serveMetadata(w, r, false)
}
func (b *Bridge) serveMetadataV1(w http.ResponseWriter, r *http.Request) { b.serveMetadata(w, r, true) }

func (b *Bridge) serveMetadata(w http.ResponseWriter, r *http.Request, v1 bool) {
	tenant := r.PathValue("tenant")
	tid := "{tenantid}"
	if !multiTenant[tenant] {
		t, ok := b.dir.Tenant(tenant)
		if !ok {
			b.writeError(w, r, unknownTenant(tenant))
			return
		}
		tid = t.GetId()
		tenant = tid
	}
	base := b.baseURL(r)
	doc := openIDConfiguration{
		TokenEndpointAuthMethodsSupported: []string{"private_key_jwt"},
		GrantTypesSupported:               []string{GrantClientCredentials},
		SubjectTypesSupported:             []string{"pairwise"},
		IDTokenSigningAlgValuesSupported:  []string{"RS256"},
	}
	if v1 {
		doc.Issuer = IssuerV1(base, tid)
		doc.AuthorizationEndpoint = base + "/" + tenant + "/oauth2/authorize"
		doc.TokenEndpoint = base + "/" + tenant + "/oauth2/token"
		doc.JWKSURI = base + "/common/discovery/keys"
	} else {
		doc.Issuer = IssuerV2(base, tid)
		doc.AuthorizationEndpoint = base + "/" + tenant + "/oauth2/v2.0/authorize"
		doc.TokenEndpoint = base + "/" + tenant + "/oauth2/v2.0/token"
		doc.JWKSURI = base + "/" + tenant + "/discovery/v2.0/keys"
	}
	w.Header().Set("Access-Control-Allow-Origin", "*")
	w.Header().Set("Cache-Control", "max-age=3600, public")
	writeJSON(w, http.StatusOK, doc)
}

// serveKeys lists every replica's public key (plus this replica's own, in
// case it has not been replicated back yet).
func (b *Bridge) serveKeys(w http.ResponseWriter, r *http.Request) {
	tenant := r.PathValue("tenant")
	if !multiTenant[tenant] {
		if _, ok := b.dir.Tenant(tenant); !ok {
			b.writeError(w, r, unknownTenant(tenant))
			return
		}
	}
	keys := append([]*ferrypb.SigningKey{b.signingKey().Public()}, b.dir.SigningKeys()...)
	w.Header().Set("Access-Control-Allow-Origin", "*")
	// Short, so that a new replica's key is picked up soon.
	w.Header().Set("Cache-Control", "max-age=300, public")
	writeJSON(w, http.StatusOK, signing.BuildJWKS(keys, b.cfg.Clock()))
}
