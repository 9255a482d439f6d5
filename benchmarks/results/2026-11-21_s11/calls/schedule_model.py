# Static schedule model behind NOTES_fwd.md v8 (eleventh session): max tiles-cost per CTA of the persistent grid
# (132 CTAs, cost = visible key blocks + 1 per tile) for {M-1-j, j} pairs, single tiles, and for causal a hybrid.
import math
G=132
def blocks(m,BM,BN,sq,sk,causal):
    off=sk-sq; lo=m*BM; hi=min((m+1)*BM,sq)-1
    nb=(sk+BN-1)//BN
    col_hi=min(hi+off if causal else sk-1, sk-1)
    return min(nb,col_hi//BN+1)
def loads(items,G):
    L=[0]*G
    for i,c in enumerate(items): L[i%G]+=c
    return max(L), sum(L)/G
for d,BM in [(64,192),(64,128),(128,128)]:
  for causal in [False,True]:
    for s in [1024,2048,4096,8192,16384]:
        b=max(1,16384//s); h=2048//d; M=math.ceil(s/BM); hb=b*h
        cost=[blocks(m,BM,128,s,s,causal)+1 for m in range(M)]  # +1: per-tile overhead
        pairs=[]
        for hbi in range(hb):
            for j in range((M+1)//2):
                last=M-1-j
                pairs.append(cost[last]+(cost[j] if last!=j else 0))
        singles=[cost[M-1-m] for hbi in range(hb) for m in range(M)]
        mp,ideal=loads(pairs,G); ms,_=loads(singles,G)
        print(f"d={d} BM={BM} causal={causal:d} s={s:5d} M={M:3d} ideal={ideal:7.1f} pairs={mp:5d} ({ideal/mp:.3f}) singles={ms:5d} ({ideal/ms:.3f})")
print("causal hybrid: whole rounds of pairs, then the rest as single tiles (long ones first)")
for d,BM in [(64,192),(64,128),(128,128)]:
    for s in [2048,4096,8192,16384]:
        b=max(1,16384//s); h=2048//d; M=math.ceil(s/BM); hb=b*h
        cost=[blocks(m,BM,128,s,s,True)+1 for m in range(M)]
        pairs=[]
        for hbi in range(hb):
            for j in range((M+1)//2):
                last=M-1-j
                pairs.append([cost[last]]+([cost[j]] if last!=j else []))
        P=len(pairs); full=P//G*G
        L=[0]*G
        for i in range(full): L[i%G]+=sum(pairs[i])
        rest=sorted([c for p in pairs[full:] for c in p], reverse=True)
        for i,c in enumerate(rest): L[i%G]+=c   # strided, long first
        mp,ideal=loads([sum(p) for p in pairs],G)
        print(f"d={d} BM={BM} s={s:5d} ideal={ideal:7.1f} pairs={mp} ({ideal/mp:.3f}) hybrid={max(L)} ({ideal/max(L):.3f})")
