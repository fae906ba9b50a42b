-- engine schema v1 as created by af66088^, mysql
CREATE TABLE audit (
	id INTEGER NOT NULL AUTO_INCREMENT, 
	at DATETIME NOT NULL, 
	event VARCHAR(64) NOT NULL, 
	host VARCHAR(255), 
	instance VARCHAR(36), 
	migration_id VARCHAR(36), 
	outcome VARCHAR(32) NOT NULL, 
	detail TEXT NOT NULL, 
	PRIMARY KEY (id)
);

CREATE INDEX ix_audit_at ON audit (at);

CREATE INDEX ix_audit_host ON audit (host);

CREATE TABLE migrations (
	id INTEGER NOT NULL AUTO_INCREMENT, 
	migration_id VARCHAR(36) NOT NULL, 
	instance_uuid VARCHAR(36) NOT NULL, 
	source VARCHAR(255) NOT NULL, 
	dest VARCHAR(255) NOT NULL, 
	generation BIGINT NOT NULL, 
	state VARCHAR(32) NOT NULL, 
	created_at DATETIME NOT NULL, 
	updated_at DATETIME NOT NULL, 
	deadline DATETIME NOT NULL, 
	error TEXT, 
	PRIMARY KEY (id), 
	UNIQUE (migration_id)
);

CREATE INDEX ix_migrations_instance_uuid ON migrations (instance_uuid);

CREATE INDEX ix_migrations_state ON migrations (state);

CREATE TABLE nonces (
	id INTEGER NOT NULL AUTO_INCREMENT, 
	host VARCHAR(255) NOT NULL, 
	nonce VARCHAR(128) NOT NULL, 
	purpose VARCHAR(32) NOT NULL, 
	created_at DATETIME NOT NULL, 
	expires_at DATETIME NOT NULL, 
	used BOOL NOT NULL, 
	PRIMARY KEY (id), 
	UNIQUE (nonce)
);

CREATE INDEX ix_nonces_expires_at ON nonces (expires_at);

CREATE INDEX ix_nonces_host ON nonces (host);

CREATE TABLE policies (
	id INTEGER NOT NULL AUTO_INCREMENT, 
	name VARCHAR(255) NOT NULL, 
	bank VARCHAR(16) NOT NULL, 
	pcrs JSON NOT NULL, 
	description TEXT NOT NULL, 
	created_at DATETIME NOT NULL, 
	PRIMARY KEY (id), 
	UNIQUE (name)
);

CREATE TABLE schema_version (
	id INTEGER NOT NULL AUTO_INCREMENT, 
	version INTEGER NOT NULL, 
	PRIMARY KEY (id)
);

CREATE TABLE vtpcms (
	id INTEGER NOT NULL AUTO_INCREMENT, 
	instance_uuid VARCHAR(36) NOT NULL, 
	vtpcm_id VARCHAR(64) NOT NULL, 
	host VARCHAR(255) NOT NULL, 
	generation BIGINT NOT NULL, 
	state VARCHAR(32) NOT NULL, 
	migration_id VARCHAR(36), 
	updated_at DATETIME NOT NULL, 
	PRIMARY KEY (id), 
	UNIQUE (instance_uuid)
);

CREATE INDEX ix_vtpcms_host ON vtpcms (host);

CREATE TABLE hosts (
	id INTEGER NOT NULL AUTO_INCREMENT, 
	name VARCHAR(255) NOT NULL, 
	ak_public BLOB NOT NULL, 
	ak_name BLOB NOT NULL, 
	kem_public BLOB NOT NULL, 
	kem_name BLOB NOT NULL, 
	ek_certificate BLOB, 
	status VARCHAR(16) NOT NULL, 
	policy_name VARCHAR(255), 
	enrolled_at DATETIME NOT NULL, 
	approved_at DATETIME, 
	PRIMARY KEY (id), 
	UNIQUE (name), 
	FOREIGN KEY(policy_name) REFERENCES policies (name)
);

CREATE TABLE clock_states (
	host VARCHAR(255) NOT NULL, 
	clock BIGINT NOT NULL, 
	reset_count BIGINT NOT NULL, 
	restart_count BIGINT NOT NULL, 
	PRIMARY KEY (host), 
	FOREIGN KEY(host) REFERENCES hosts (name) ON DELETE CASCADE
);

CREATE TABLE verdicts (
	host VARCHAR(255) NOT NULL, 
	status VARCHAR(16) NOT NULL, 
	reason TEXT NOT NULL, 
	attested_at DATETIME NOT NULL, 
	expires_at DATETIME NOT NULL, 
	PRIMARY KEY (host), 
	FOREIGN KEY(host) REFERENCES hosts (name) ON DELETE CASCADE
);

CREATE INDEX ix_verdicts_expires_at ON verdicts (expires_at);
